"""Simulated flexible execution over cached member outputs.

Everything a threshold search needs is per stage and per sample: the halting confidence,
whether the running prediction is right, and what each stage costs. :class:`StageTable`
holds exactly that, built with :func:`flexens.halting.stage_outputs`, the same arithmetic
the inference loop runs, so a simulated exit equals a real one sample by sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flexens.halting import Criterion, exit_stages, oracle_exits, stage_outputs


@dataclass(frozen=True)
class Outcome:
    """What one threshold set does on the calibration samples."""

    thresholds: tuple[float, ...]
    error: float
    latency_ms: float
    avg_members: float

    @property
    def accuracy(self) -> float:
        return 1.0 - self.error


@dataclass
class StageTable:
    """Per-stage confidence and correctness of every calibration sample.

    ``confidence`` and ``correct`` are ``(N, S)``; ``stage_cost_ms`` is ``(N,)``, the cost of
    running stage ``k`` (member forward pass plus the halting check).
    """

    confidence: np.ndarray
    correct: np.ndarray
    predictions: np.ndarray
    stage_cost_ms: np.ndarray

    @classmethod
    def from_probs(
        cls,
        member_probs: torch.Tensor,
        labels: torch.Tensor,
        criterion: Criterion,
        stage_cost_ms: np.ndarray,
    ) -> StageTable:
        confidence, predictions = stage_outputs(member_probs, criterion)
        correct = predictions == labels.unsqueeze(0)
        return cls(
            confidence=confidence.numpy().astype(np.float32),
            correct=correct.numpy(),
            predictions=predictions.numpy(),
            stage_cost_ms=np.asarray(stage_cost_ms, dtype=np.float64),
        )

    @property
    def num_members(self) -> int:
        return self.confidence.shape[0]

    @property
    def num_samples(self) -> int:
        return self.confidence.shape[1]

    @property
    def cumulative_cost_ms(self) -> np.ndarray:
        return np.cumsum(self.stage_cost_ms)

    def exits(self, thresholds) -> np.ndarray:
        """Exit stage of every sample (via the shared halting function)."""
        return exit_stages(torch.from_numpy(self.confidence), torch.as_tensor(thresholds)).numpy()

    def outcome_of_exits(self, exits: np.ndarray, thresholds=()) -> Outcome:
        samples = np.arange(self.num_samples)
        return Outcome(
            thresholds=tuple(float(t) for t in thresholds),
            error=float(1.0 - self.correct[exits, samples].mean()),
            latency_ms=float(self.cumulative_cost_ms[exits].mean()),
            avg_members=float((exits + 1).mean()),
        )

    def evaluate(self, thresholds) -> Outcome:
        return self.outcome_of_exits(self.exits(thresholds), thresholds)

    def full(self) -> Outcome:
        """All members, always: the plain ensemble."""
        return self.outcome_of_exits(
            np.full(self.num_samples, self.num_members - 1), [1.0] * (self.num_members - 1)
        )

    def prefix(self, k: int) -> Outcome:
        """The first ``k`` members, always (a smaller plain ensemble)."""
        return self.outcome_of_exits(np.full(self.num_samples, k - 1))

    def oracle(self) -> Outcome:
        """Earliest stage whose running prediction already equals the full ensemble's.

        This is the floor any halting rule can reach at full-ensemble accuracy.
        """
        return self.outcome_of_exits(oracle_exits(torch.from_numpy(self.predictions)).numpy())
