"""``FlexibleEnsembleModule``: run members one after another, halting per sample.

The Lightning face of :mod:`flexens.execution` (``predict_step``, modes, devices); the
loop itself, and the :class:`EnsembleOutput` it answers with, live there.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as L
import torch
from torch import Tensor, nn

from flexens.cuda_graphs import CudaGraphed, bucket_size, graphed_members
from flexens.execution import (
    EnsembleOutput,
    probability_fn,
    run_flexible,
    run_full,
    run_oracle,
    run_prefix,
)
from flexens.fused import FusedMembers, FusedTail, can_fuse
from flexens.halting import (
    get_criterion,
    validate_thresholds,
)
from flexens.staged import StagedStream

MODES = ("flexible", "full", "first_k", "oracle")

__all__ = [
    "MODES",
    "EnsembleOutput",
    "FlexibleEnsembleModule",
    "probability_fn",
    "run_flexible",
    "run_full",
    "run_oracle",
    "run_prefix",
]


class FlexibleEnsembleModule(L.LightningModule):
    """An ensemble that answers as soon as its halting criterion is confident enough.

    ``mode``: ``flexible`` (calibrated thresholds), ``full`` (every member), ``first_k``
    (the first ``first_k`` members), ``oracle`` (evaluation only: all members run, each
    sample answers at the earliest stage that already agrees with the full ensemble).
    ``cuda_graphs``: on a GPU, run each member from CUDA graphs when no gradient is needed.
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        thresholds: Sequence[float] | None = None,
        criterion: str = "margin",
        mode: str = "flexible",
        first_k: int | None = None,
        channels_last: bool = False,
        fuse_from: int | None = None,
        cuda_graphs: bool = False,
    ) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self._graphed: list[CudaGraphed] | None = None
        self.cuda_graphs = cuda_graphs
        self.members = nn.ModuleList(members).eval()
        self.fused: FusedMembers | None = None
        self.set_fuse_from(fuse_from)
        self.criterion_name = criterion
        self.criterion = get_criterion(criterion)
        self.channels_last = channels_last
        self.set_thresholds(thresholds if thresholds is not None else [1.0] * (len(members) - 1))
        self.set_mode(mode, first_k)

    @property
    def num_members(self) -> int:
        return len(self.members)

    def runners(self, x: Tensor) -> list[nn.Module]:
        """The members as this call runs them: with ``cuda_graphs``, inference on a GPU
        replays each member from CUDA graphs (one launch instead of one per kernel, padded
        sub-batches: :mod:`flexens.cuda_graphs`); anything else runs them as they are."""
        if not (self.cuda_graphs and x.is_cuda and not torch.is_grad_enabled()):
            return list(self.members)
        if self._graphed is None:
            self._graphed = graphed_members(self.members)
        return self._graphed

    def prepare_graphs(self, example: Tensor, max_batch: int) -> None:
        """Capture now every member graph a batch of up to ``max_batch`` can need (a
        capture costs milliseconds, which no timed or served call should pay)."""
        sizes = [1 << b for b in range(bucket_size(max_batch).bit_length())]
        with torch.inference_mode():
            for member in self.runners(example):
                if isinstance(member, CudaGraphed):
                    member.prepare(example, sizes)

    def _apply(self, fn, *args, **kwargs):
        self._graphed = None  # captured with the old weights' addresses
        return super()._apply(fn, *args, **kwargs)

    def set_thresholds(self, thresholds: Sequence[float]) -> None:
        # Plain Python floats: reading them in the loop costs no device sync.
        self.thresholds = [float(t) for t in validate_thresholds(thresholds, self.num_members)]

    def set_fuse_from(self, fuse_from: int | None) -> None:
        """Fused continuation after stage ``fuse_from - 1`` (None: members one by one).

        Off by default: it pays only where the latency profile says so
        (:func:`flexens.latency.best_fuse_from`), and needs members of one architecture.
        """
        if fuse_from is not None:
            if not 1 <= fuse_from <= self.num_members - 2:
                raise ValueError(
                    f"fuse_from must be in 1..{self.num_members - 2} (members left to fuse), "
                    f"got {fuse_from}"
                )
            if not can_fuse(list(self.members)):
                raise ValueError("fused continuation needs members of one architecture")
            if self.fused is None:
                device = next(self.members.parameters()).device
                self.fused = FusedMembers(list(self.members)).to(device)
        self.fuse_from = fuse_from

    def set_mode(self, mode: str, first_k: int | None = None) -> None:
        if mode not in MODES:
            raise ValueError(
                f"unknown mode {mode!r}; use one of {', '.join(MODES)} (infer.mode=...)"
            )
        if mode == "first_k" and not (first_k is not None and 1 <= first_k <= self.num_members):
            raise ValueError(
                f"first_k must be in 1..{self.num_members}, got {first_k} (infer.first_k=...)"
            )
        self.mode, self.first_k = mode, first_k

    def forward(self, x: Tensor, thresholds: Tensor | None = None) -> EnsembleOutput:
        """``thresholds``: optional ``(B, N-1)`` per-sample thresholds (``flexible`` mode only),
        for a batch whose samples asked for different operating points."""
        x = self._prepare(x)
        members = self.runners(x)
        if thresholds is not None:
            if self.mode != "flexible":
                raise ValueError(f"per-sample thresholds need mode 'flexible', not {self.mode!r}")
            if tuple(thresholds.shape) != (x.shape[0], self.num_members - 1):
                raise ValueError(
                    f"per-sample thresholds must be (batch, N-1) = "
                    f"({x.shape[0]}, {self.num_members - 1}), got {tuple(thresholds.shape)}"
                )
        if self.mode == "flexible":
            limits = self.thresholds if thresholds is None else thresholds
            tail = None if self.fuse_from is None else FusedTail(self.fused, self.fuse_from)
            return run_flexible(members, x, limits, self.criterion, tail)
        if self.mode == "oracle":
            return run_oracle(members, x, self.criterion)
        used = members if self.mode == "full" else members[: self.first_k]
        probs = run_full(used, x)
        exit_stage = torch.full((x.shape[0],), len(used) - 1, dtype=torch.long, device=x.device)
        return EnsembleOutput(probs=probs, exit_stage=exit_stage, confidence=self.criterion(probs))

    def staged(self, batch_size: int) -> StagedStream:
        """This ensemble's calibrated thresholds over a stream of batches, every member at
        ``batch_size`` (:mod:`flexens.staged`): for offline throughput. Each call runs its
        member as :meth:`runners` picks for it, so from CUDA graphs on a GPU with
        ``cuda_graphs`` (full batches hit a captured size exactly)."""
        return StagedStream(
            [lambda x, k=k: probability_fn(self.runners(x)[k])(x) for k in range(self.num_members)],
            self.thresholds,
            self.criterion,
            batch_size,
            self._prepare,
        )

    def _prepare(self, x: Tensor) -> Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def predict_step(self, batch, batch_idx: int = 0) -> EnsembleOutput:
        x, target = (batch[0], batch[1]) if isinstance(batch, list | tuple) else (batch, None)
        out = self(x)
        out.target = target
        return out
