"""``FlexibleEnsembleModule``: run members one after another, halting per sample.

In ``flexible`` mode only the samples still undecided go on to the next member: the batch
shrinks stage by stage (index, run, scatter back), with one host sync per stage to learn
who is left. The halting arithmetic is :mod:`flexens.halting`, the same code the
calibration simulation runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import pytorch_lightning as L
import torch
from torch import Tensor, nn

from flexens.fused import FusedMembers, FusedTail, can_fuse
from flexens.halting import (
    Criterion,
    ProbabilityFn,
    get_criterion,
    oracle_exits,
    running_means,
    should_halt,
    validate_thresholds,
)

MODES = ("flexible", "full", "first_k", "oracle")


@dataclass
class EnsembleOutput:
    """What the ensemble answers for a batch, one row per sample.

    ``probs`` ``(B, C)`` is the running mean the sample answered with, ``exit_stage`` the
    0-based member it stopped after, ``confidence`` the criterion's value there. ``target``
    is filled by ``predict_step`` when the batch is labelled. (Not frozen: Lightning moves
    predictions to the CPU field by field.)
    """

    probs: Tensor
    exit_stage: Tensor
    confidence: Tensor
    target: Tensor | None = None

    @property
    def prediction(self) -> Tensor:
        return self.probs.argmax(dim=1)

    def cpu(self) -> EnsembleOutput:
        return EnsembleOutput(**{f.name: _cpu(getattr(self, f.name)) for f in fields(self)})

    @classmethod
    def cat(cls, outputs: Sequence[EnsembleOutput]) -> EnsembleOutput:
        """Batches joined in order (e.g. what ``Trainer.predict`` returns)."""
        return cls(
            **{
                f.name: None
                if getattr(outputs[0], f.name) is None
                else torch.cat([getattr(o, f.name) for o in outputs])
                for f in fields(cls)
            }
        )


def _cpu(value: Tensor | None) -> Tensor | None:
    return None if value is None else value.cpu()


def probability_fn(member: nn.Module) -> ProbabilityFn:
    """A network as the halting loop sees it: softmax of its logits, in float32."""
    return lambda x: member(x).float().softmax(dim=-1)


def run_full(members: Sequence[nn.Module], x: Tensor) -> Tensor:
    """Plain averaged ensemble: what a hand-written loop over the members computes."""
    *_, mean = running_means([probability_fn(m) for m in members], x)
    return mean


def run_flexible(
    members: Sequence[nn.Module],
    x: Tensor,
    thresholds: Sequence[float] | Tensor,
    criterion: Criterion,
    tail: FusedTail | None = None,
) -> EnsembleOutput:
    """Batched halting: each stage runs only on the samples still undecided.

    Every stage writes its running result for all its active samples; samples that go on
    are simply overwritten by a later stage, so no halted subset has to be gathered. One
    host sync per stage learns who is left. With ``tail`` the samples that reach its first
    stage run all remaining members in one fused call; the halting arithmetic is unchanged.

    ``thresholds`` is one set ``T_1..T_{N-1}`` for the whole batch, or a ``(B, N-1)`` tensor
    with one set per sample: a server batches requests that asked for different operating
    points, and each sample must halt exactly where it would alone. Per-sample thresholds
    are compared in the confidence's dtype, which is what comparing with a Python float
    does, so a row equal to the shared set gives the same decisions.
    """
    per_sample = isinstance(thresholds, Tensor) and thresholds.dim() == 2
    limits = thresholds.to(x.device) if per_sample else None
    n, batch = len(members), x.shape[0]
    fns = [probability_fn(m) for m in members]
    if tail is not None:
        fns[tail.first :] = tail.functions()
    active = torch.arange(batch, device=x.device)
    exit_stage = torch.full((batch,), n - 1, dtype=torch.long, device=x.device)
    confidence = torch.empty(batch, device=x.device)
    probs_out: Tensor | None = None
    loop = running_means(fns, x)
    mean = next(loop)
    for k in range(n):
        conf = criterion(mean)
        if probs_out is None:
            probs_out = mean.new_empty(batch, mean.shape[1])
        probs_out.index_copy_(0, active, mean)
        confidence.index_copy_(0, active, conf)
        exit_stage.index_fill_(0, active, k)
        if k == n - 1:
            break
        limit = limits[:, k].to(conf.dtype) if per_sample else thresholds[k]
        keep = (~should_halt(conf, limit, is_last=False)).nonzero().squeeze(1)
        if keep.numel() == 0:
            break
        active = active[keep]
        shrink = keep.numel() < conf.numel()
        if per_sample and shrink:
            limits = limits[keep]
        if tail is not None:
            tail.narrow(keep if shrink else None)
        mean = loop.send(keep if shrink else None)
    return EnsembleOutput(probs=probs_out, exit_stage=exit_stage, confidence=confidence)


def run_prefix(members: Sequence[nn.Module], x: Tensor) -> Tensor:
    """Every stage's running mean for every sample, ``(N, B, C)``: all members run."""
    return torch.stack(list(running_means([probability_fn(m) for m in members], x)))


def run_oracle(members: Sequence[nn.Module], x: Tensor, criterion: Criterion) -> EnsembleOutput:
    """Each sample answers at the earliest stage that already agrees with the full ensemble."""
    stage_probs = run_prefix(members, x)
    exit_stage = oracle_exits(stage_probs.argmax(dim=2))
    probs = stage_probs[exit_stage, torch.arange(x.shape[0], device=x.device)]
    return EnsembleOutput(probs=probs, exit_stage=exit_stage, confidence=criterion(probs))


class FlexibleEnsembleModule(L.LightningModule):
    """An ensemble that answers as soon as its halting criterion is confident enough.

    ``mode``: ``flexible`` (calibrated thresholds), ``full`` (every member), ``first_k``
    (the first ``first_k`` members), ``oracle`` (evaluation only: all members run, each
    sample answers at the earliest stage that already agrees with the full ensemble).
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
    ) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
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
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        members = list(self.members)
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

    def predict_step(self, batch, batch_idx: int = 0) -> EnsembleOutput:
        x, target = (batch[0], batch[1]) if isinstance(batch, list | tuple) else (batch, None)
        out = self(x)
        out.target = target
        return out
