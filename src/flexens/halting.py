"""Halting criteria and the one halting decision shared by calibration and inference.

After member ``k`` the ensemble's running prediction is ``p̄_k = mean(softmax(z_1..z_k))``.
A *criterion* maps ``p̄_k`` to a confidence in [0, 1]; the ensemble halts after stage ``k``
when ``confidence > T_k``. The last member always answers. Calibration (simulation over
cached logits) and ``FlexibleEnsembleModule.predict_step`` both call :func:`running_mean`,
the registered criterion and :func:`should_halt`, so they cannot drift apart, and every
execution (flexible, full, first-k, oracle, the calibration's stage table) walks the members
through the one loop :func:`running_means`. The staged stream (:mod:`flexens.staged`), which
gathers each stage's batch across input batches, takes that loop's steps one stage at a
time: :func:`add_member`, :func:`running_mean`, the criterion, :func:`should_halt`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence

import torch
from torch import Tensor

Criterion = Callable[[Tensor], Tensor]
"""Maps averaged probabilities ``(..., C)`` to a confidence ``(...)`` in [0, 1]."""

ProbabilityFn = Callable[[Tensor], Tensor]
"""A member as the halting loop sees it: inputs ``(B, ...)`` → class probabilities ``(B, C)``.
A network is ``softmax(net(x))``; a cached member is its output table indexed by sample."""

_CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str) -> Callable[[Criterion], Criterion]:
    """Decorator: adding a criterion is writing one function and registering it."""

    def wrap(fn: Criterion) -> Criterion:
        _CRITERIA[name] = fn
        return fn

    return wrap


def get_criterion(name: str) -> Criterion:
    try:
        return _CRITERIA[name]
    except KeyError:
        raise ValueError(
            f"unknown halting criterion {name!r}; choose one of {sorted(_CRITERIA)} "
            "(calibrate.criterion=...)"
        ) from None


def criterion_names() -> list[str]:
    return sorted(_CRITERIA)


@register_criterion("margin")
def score_margin(probs: Tensor) -> Tensor:
    """The paper's score margin: top-1 minus top-2 averaged probability."""
    top2 = probs.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


@register_criterion("max_prob")
def max_probability(probs: Tensor) -> Tensor:
    """Largest averaged class probability."""
    return probs.amax(dim=-1)


@register_criterion("entropy")
def normalised_negentropy(probs: Tensor) -> Tensor:
    """``1 − H(p̄)/log C``: 1 for a one-hot prediction, 0 for a uniform one."""
    num_classes = probs.shape[-1]
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)
    return 1.0 - entropy / math.log(num_classes)


def add_member(prob_sum: Tensor | None, probs: Tensor) -> Tensor:
    """The running sum of probabilities after one more member (the first one starts it)."""
    return probs if prob_sum is None else prob_sum + probs


def running_mean(prob_sum: Tensor, members_seen: int) -> Tensor:
    """Averaged probabilities after ``members_seen`` members, from their running sum."""
    return prob_sum / members_seen


def should_halt(confidence: Tensor, threshold: float | Tensor, is_last: bool) -> Tensor:
    """The halting decision: strictly above the stage threshold, or the last member."""
    if is_last:
        return torch.ones_like(confidence, dtype=torch.bool)
    return confidence > threshold


def validate_thresholds(thresholds: Tensor | list[float], num_members: int) -> Tensor:
    """Thresholds ``T_1..T_{N-1}`` as a float tensor, checked against the member count."""
    t = torch.as_tensor(thresholds, dtype=torch.float64).flatten()
    if t.numel() != num_members - 1:
        raise ValueError(
            f"got {t.numel()} thresholds for {num_members} members; an ensemble of N members "
            f"needs N-1 = {num_members - 1} (recalibrate with calibrate.py)"
        )
    if not torch.isfinite(t).all():
        raise ValueError(f"thresholds must be finite numbers, got {t.tolist()}")
    return t


def running_means(
    members: Sequence[ProbabilityFn], inputs: Tensor
) -> Generator[Tensor, Tensor | None, None]:
    """The one execution loop: yields ``p̄_k`` after each member ``k``.

    Plain iteration runs every member on every input. Sending the positions (within the
    current batch) of the samples that go on, ``loop.send(keep)``, shrinks the batch, so
    later members only see undecided samples; the running sum shrinks with it.
    """
    prob_sum: Tensor | None = None
    for k, member in enumerate(members, start=1):
        probs = member(inputs)
        prob_sum = add_member(prob_sum, probs)
        keep = yield running_mean(prob_sum, k)
        if keep is not None:
            inputs, prob_sum = inputs[keep], prob_sum[keep]


def stage_outputs(member_probs: Tensor, criterion: Criterion) -> tuple[Tensor, Tensor]:
    """Confidence and running prediction of every stage for every sample.

    ``member_probs`` is ``(N, S, C)`` (members × samples × classes), cached member outputs.
    Returns ``confidence (N, S)`` and ``prediction (N, S)``, from the same loop inference runs.
    """
    samples = torch.arange(member_probs.shape[1])
    confidences, predictions = [], []
    for mean in running_means([probs.__getitem__ for probs in member_probs], samples):
        confidences.append(criterion(mean))
        predictions.append(mean.argmax(dim=-1))
    return torch.stack(confidences), torch.stack(predictions)


def oracle_exits(predictions: Tensor) -> Tensor:
    """Earliest stage whose running prediction already equals the full ensemble's.

    ``predictions`` is ``(N, S)``; the result ``(S,)``. The floor any halting rule can reach
    at full-ensemble accuracy (it needs every member's output, so it is evaluation only).
    """
    return (predictions == predictions[-1:]).to(torch.int8).argmax(dim=0).long()


def exit_stages(confidence: Tensor, thresholds: Tensor) -> Tensor:
    """Exit stage (0-based) of each sample for one threshold set.

    ``confidence`` is ``(N, S)``; the result is ``(S,)``, the first stage whose decision
    :func:`should_halt` is true.
    """
    num_members = confidence.shape[0]
    thresholds = validate_thresholds(thresholds, num_members)
    halts = torch.stack(
        [
            should_halt(
                confidence[k],
                float(thresholds[k]) if k < num_members - 1 else 0.0,
                is_last=k == num_members - 1,
            )
            for k in range(num_members)
        ]
    )
    # argmax of a bool tensor returns the first True; the last row is all True.
    return halts.to(torch.int8).argmax(dim=0)
