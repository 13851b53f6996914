"""The execution loop of an ensemble, without Lightning: what calibration prices, what
``FlexibleEnsembleModule`` runs, and what the latency profile times.

In ``flexible`` mode only the samples still undecided go on to the next member: the batch
shrinks stage by stage (index, run, scatter back), with one host sync per stage to learn
who is left. The halting arithmetic is :mod:`flexens.halting`, the same code the
calibration simulation runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from flexens.fused import FusedTail
from flexens.halting import (
    Criterion,
    ProbabilityFn,
    oracle_exits,
    running_means,
    should_halt,
)


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
    if batch == 1 and tail is None:  # a row of floats compares as the float32 row does
        return _run_one(fns, x, thresholds[0].tolist() if per_sample else thresholds, criterion)
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


def _run_one(
    fns: Sequence[ProbabilityFn], x: Tensor, thresholds: Sequence[float], criterion: Criterion
) -> EnsembleOutput:
    """:func:`run_flexible` for a batch of one: the same stages and decisions, read on the
    host once per stage, without the index bookkeeping a batch needs to scatter answers
    back. At batch 1 on a CPU that bookkeeping is a few small operators per stage, a
    measurable part of a small member's cost, and a server answers a lone request this way."""
    last = len(fns) - 1
    for k, mean in enumerate(running_means(fns, x)):
        confidence = criterion(mean)
        if k == last or bool(should_halt(confidence, thresholds[k], is_last=False)):
            break
    stage = torch.full((1,), k, dtype=torch.long, device=x.device)
    return EnsembleOutput(probs=mean, exit_stage=stage, confidence=confidence)


def run_prefix(members: Sequence[nn.Module], x: Tensor) -> Tensor:
    """Every stage's running mean for every sample, ``(N, B, C)``: all members run."""
    return torch.stack(list(running_means([probability_fn(m) for m in members], x)))


def run_oracle(members: Sequence[nn.Module], x: Tensor, criterion: Criterion) -> EnsembleOutput:
    """Each sample answers at the earliest stage that already agrees with the full ensemble."""
    stage_probs = run_prefix(members, x)
    exit_stage = oracle_exits(stage_probs.argmax(dim=2))
    probs = stage_probs[exit_stage, torch.arange(x.shape[0], device=x.device)]
    return EnsembleOutput(probs=probs, exit_stage=exit_stage, confidence=criterion(probs))
