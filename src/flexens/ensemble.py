"""``FlexibleEnsembleModule``: run members one after another, halting per sample.

In ``flexible`` mode only the samples still undecided go on to the next member: the batch
shrinks stage by stage (index, run, scatter back), with one host sync per stage to learn
who is left. The halting arithmetic is :mod:`flexens.halting`, the same code the
calibration simulation runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as L
import torch
from torch import Tensor, nn

from flexens.halting import Criterion, get_criterion, running_mean, should_halt, validate_thresholds

MODES = ("flexible", "full", "first_k", "oracle")


def _probs(member: nn.Module, x: Tensor) -> Tensor:
    return member(x).float().softmax(dim=-1)


def run_full(members: Sequence[nn.Module], x: Tensor) -> Tensor:
    """Plain averaged ensemble: what a hand-written loop over the members computes."""
    prob_sum = _probs(members[0], x)
    for member in members[1:]:
        prob_sum = prob_sum + _probs(member, x)
    return running_mean(prob_sum, len(members))


def run_flexible(
    members: Sequence[nn.Module],
    x: Tensor,
    thresholds: Sequence[float] | Tensor,
    criterion: Criterion,
) -> dict[str, Tensor]:
    """Batched halting: each stage runs only on the samples still undecided.

    Every stage writes its running result for all its active samples; samples that go on
    are simply overwritten by a later stage, so no halted subset has to be gathered.

    ``thresholds`` is one set ``T_1..T_{N-1}`` for the whole batch, or a ``(B, N-1)`` tensor
    with one set per sample: a server batches requests that asked for different operating
    points, and each sample must halt exactly where it would alone. Per-sample thresholds
    are compared in the confidence's dtype, which is what comparing with a Python float
    does, so a row equal to the shared set gives bit-identical decisions.
    """
    per_sample = isinstance(thresholds, Tensor) and thresholds.dim() == 2
    n, batch = len(members), x.shape[0]
    active = torch.arange(batch, device=x.device)
    exit_stage = torch.full((batch,), n - 1, dtype=torch.long, device=x.device)
    confidence = torch.empty(batch, device=x.device)
    probs_out: Tensor | None = None
    prob_sum: Tensor | None = None
    limits = thresholds.to(x.device) if per_sample else None
    for k, member in enumerate(members):
        probs = _probs(member, x)
        prob_sum = probs if prob_sum is None else prob_sum + probs
        mean = running_mean(prob_sum, k + 1)
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
        if keep.numel() == 0:  # the one host sync of this stage
            break
        if keep.numel() < active.numel():
            active, prob_sum, x = active[keep], prob_sum[keep], x[keep]
            limits = limits[keep] if per_sample else None
    return {
        "probs": probs_out,
        "prediction": probs_out.argmax(dim=1),
        "exit_stage": exit_stage,
        "confidence": confidence,
    }


def run_prefix(members: Sequence[nn.Module], x: Tensor, criterion: Criterion) -> dict[str, Tensor]:
    """All members on all samples, keeping every stage's running prediction (oracle)."""
    prob_sum, means = None, []
    for k, member in enumerate(members):
        probs = _probs(member, x)
        prob_sum = probs if prob_sum is None else prob_sum + probs
        means.append(running_mean(prob_sum, k + 1))
    stacked = torch.stack(means)  # (N, B, C)
    return {"stage_probs": stacked, "stage_confidence": criterion(stacked)}


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
    ) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members).eval()
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

    def forward(self, x: Tensor, thresholds: Tensor | None = None) -> dict[str, Tensor]:
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
            return run_flexible(members, x, limits, self.criterion)
        if self.mode == "oracle":
            return self._oracle(members, x)
        used = members if self.mode == "full" else members[: self.first_k]
        probs = run_full(used, x)
        exit_stage = torch.full((x.shape[0],), len(used) - 1, dtype=torch.long, device=x.device)
        return {
            "probs": probs,
            "prediction": probs.argmax(dim=1),
            "exit_stage": exit_stage,
            "confidence": self.criterion(probs),
        }

    def _oracle(self, members: list[nn.Module], x: Tensor) -> dict[str, Tensor]:
        out = run_prefix(members, x, self.criterion)
        predictions = out["stage_probs"].argmax(dim=2)  # (N, B)
        exit_stage = (predictions == predictions[-1:]).to(torch.int8).argmax(dim=0).long()
        samples = torch.arange(x.shape[0], device=x.device)
        probs = out["stage_probs"][exit_stage, samples]
        return {
            "probs": probs,
            "prediction": probs.argmax(dim=1),
            "exit_stage": exit_stage,
            "confidence": out["stage_confidence"][exit_stage, samples],
        }

    def predict_step(self, batch, batch_idx: int = 0) -> dict[str, Tensor]:
        x, target = (batch[0], batch[1]) if isinstance(batch, list | tuple) else (batch, None)
        out = self(x)
        if target is not None:
            out["target"] = target
        return out
