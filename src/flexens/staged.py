"""Flexible execution over a stream of batches with every member at a full batch: for
offline throughput (scoring a split or a folder), not for a server's latency.

Batch by batch (:func:`flexens.execution.run_flexible`), member ``k`` sees only the samples
of its own batch that are still undecided: at the CIFAR-10 default point a batch of 256
leaves about 100, 80, 40 and 10 samples for members 2 to 5, at the digits quickstart's a
handful for members 2 and 3. Wherever a call has a fixed cost that a few samples do not
fill (a GPU, or small members on a CPU) such calls cost far more per image than the full
batch. Here every stage has a queue instead: the samples a stage leaves undecided wait in
the next stage's queue until a full batch has gathered, so every member call but the last
few at the end of the stream runs at the serving batch, and a stream costs about the
members' batched cost per image times the members used
(:func:`flexens.latency.expected_throughput` with ``staged_images``).

A sample's arithmetic is the one of :func:`flexens.halting.running_means`: the same running
sum in the same order (:func:`flexens.halting.add_member`), the same criterion and
:func:`flexens.halting.should_halt`. So a sample halts at the stage it halts at batch by
batch and answers the same, as far as a member's output does not depend on which other
samples share its batch (``tests/test_staged.py`` checks it). The price is latency: an
undecided sample waits for others, so this is a pass over a dataset, not a server's path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from flexens.execution import EnsembleOutput
from flexens.halting import (
    Criterion,
    ProbabilityFn,
    add_member,
    running_mean,
    should_halt,
    validate_thresholds,
)


@dataclass
class _Queue:
    """Samples waiting for one stage: their positions in the stream, inputs and running sums
    (``None`` before the first member), as the chunks they arrived in."""

    chunks: list[tuple[Tensor, Tensor, Tensor | None]] = field(default_factory=list)
    count: int = 0

    def put(self, index: Tensor, x: Tensor, prob_sum: Tensor | None) -> None:
        if len(index):
            self.chunks.append((index, x, prob_sum))
            self.count += len(index)

    def take(self, size: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """The first ``size`` samples (or all, if fewer wait), in arrival order. A lone chunk
        is sliced, not copied: when every sample of a full batch goes on, the next stage's
        queue holds just that chunk."""
        if len(self.chunks) == 1:
            index, x, prob_sum = self.chunks[0]
            self.chunks, self.count = [], 0
            self.put(index[size:], x[size:], None if prob_sum is None else prob_sum[size:])
            return index[:size], x[:size], None if prob_sum is None else prob_sum[:size]
        parts = list(zip(*self.chunks, strict=True))
        index, x = torch.cat(parts[0]), torch.cat(parts[1])
        prob_sum = None if parts[2][0] is None else torch.cat(parts[2])
        rest = (index[size:], x[size:], None if prob_sum is None else prob_sum[size:])
        self.chunks, self.count = [], 0
        self.put(*rest)
        return index[:size], x[:size], None if prob_sum is None else prob_sum[:size]


class StagedStream:
    """A flexible ensemble over a stream: ``push`` batches (or call it), ``finish`` runs
    what still waits and answers every pushed sample, in the order pushed.

    ``members`` are probability functions (:func:`flexens.execution.probability_fn`);
    ``prepare`` is applied to each pushed batch (e.g. the channels_last conversion a
    :class:`~flexens.ensemble.FlexibleEnsembleModule` makes).
    """

    def __init__(
        self,
        members: Sequence[ProbabilityFn],
        thresholds: Sequence[float],
        criterion: Criterion,
        batch_size: int,
        prepare: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"a staged stream needs a batch size >= 1, got {batch_size!r}")
        self.members = list(members)
        self.thresholds = [float(t) for t in validate_thresholds(thresholds, len(members))]
        self.criterion = criterion
        self.batch_size = batch_size
        self.prepare = prepare
        self._start()

    def fresh(self) -> StagedStream:
        """An empty stream over the same members and settings (one per timed thread count)."""
        return StagedStream(
            self.members, self.thresholds, self.criterion, self.batch_size, self.prepare
        )

    def _start(self) -> None:
        self._queues = [_Queue() for _ in self.members]
        self._answers: list[tuple[Tensor, Tensor, Tensor, int]] = []
        self._pushed = 0

    def push(self, x: Tensor) -> None:
        """Queue a batch for the first member and run every stage that has a full batch."""
        if self.prepare is not None:
            x = self.prepare(x)
        index = torch.arange(self._pushed, self._pushed + len(x), device=x.device)
        self._pushed += len(x)
        self._queues[0].put(index, x, None)
        self._drain(full_only=True)

    __call__ = push

    def finish(self) -> EnsembleOutput:
        """Run what still waits, stage by stage, and answer every sample pushed since the
        last ``finish``; the stream is empty again afterwards."""
        self._drain(full_only=False)
        if not self._answers:
            raise ValueError("nothing was pushed into the staged stream")
        index, probs, confidence, stages = zip(*self._answers, strict=True)
        exit_stage = torch.cat(
            [
                torch.full((len(i),), k, dtype=torch.long, device=i.device)
                for i, k in zip(index, stages, strict=True)
            ]
        )
        order = torch.cat(index).argsort()
        self._start()
        return EnsembleOutput(
            probs=torch.cat(probs)[order],
            exit_stage=exit_stage[order],
            confidence=torch.cat(confidence)[order],
        )

    def run(self, batches: Iterable[Tensor]) -> EnsembleOutput:
        """Every batch pushed, then :meth:`finish`."""
        for x in batches:
            self.push(x)
        return self.finish()

    def _drain(self, full_only: bool) -> None:
        for k, queue in enumerate(self._queues):
            while queue.count >= self.batch_size or (queue.count and not full_only):
                self._stage(k, *queue.take(self.batch_size))

    def _stage(self, k: int, index: Tensor, x: Tensor, prob_sum: Tensor | None) -> None:
        """Member ``k`` on one gathered batch: who halts answers, the rest wait for ``k+1``.

        One host sync per stage, as batch by batch: the count of samples that halt. A stable
        sort of the decisions then lists those that halt, then those that go on, each in
        arrival order, and both are gathered by position (masking each tensor would sync once
        per tensor, which on a GPU cost more than a member's call). Indexing keeps a
        channels_last batch channels_last, as batch by batch does (``index_select`` would
        not)."""
        prob_sum = add_member(prob_sum, self.members[k](x))
        mean = running_mean(prob_sum, k + 1)
        confidence = self.criterion(mean)
        if k == len(self.members) - 1:
            self._answers.append((index, mean, confidence, k))
            return
        go_on = ~should_halt(confidence, self.thresholds[k], is_last=False)
        halting = len(go_on) - int(go_on.sum())
        order = go_on.to(torch.uint8).argsort(stable=True)
        stop, go = order[:halting], order[halting:]
        self._answers.append((index[stop], mean[stop], confidence[stop], k))
        self._queues[k + 1].put(index[go], x[go], prob_sum[go])
