"""The Pareto front of (expected latency, calibration error) threshold sets.

Inference can switch operating point at run time by picking from the front, without
recalibrating: the front answers every objective (λ, max drop, budget) over the points the
search met.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flexens.calibration.objectives import Objective


def non_dominated(latency: np.ndarray, error: np.ndarray) -> np.ndarray:
    """Indices of points no other point beats on both latency and error, cheapest first."""
    order = np.lexsort((error, latency))
    keep, best_error = [], np.inf
    for i in order:
        if error[i] < best_error - 1e-15:
            keep.append(i)
            best_error = error[i]
    return np.asarray(keep, dtype=np.int64)


class ParetoCollector:
    """Accumulates scored threshold sets, keeping only the non-dominated ones."""

    def __init__(self, num_thresholds: int) -> None:
        self.thresholds = np.empty((0, num_thresholds))
        self.latency_ms = np.empty(0)
        self.error = np.empty(0)

    def add_points(self, thresholds: np.ndarray, latency: np.ndarray, error: np.ndarray) -> None:
        t = np.vstack([self.thresholds, thresholds])
        lat = np.concatenate([self.latency_ms, latency])
        err = np.concatenate([self.error, error])
        keep = non_dominated(lat, err)
        self.thresholds, self.latency_ms, self.error = t[keep], lat[keep], err[keep]

    def add_sweep(
        self, base: np.ndarray, stage: int, grid: np.ndarray, latency: np.ndarray, error: np.ndarray
    ) -> None:
        # Cheap pre-filter: only the sweep's own front can join the global one.
        keep = non_dominated(latency, error)
        t = np.repeat(np.asarray(base, dtype=np.float64)[None, :], len(keep), axis=0)
        t[:, stage] = grid[keep]
        self.add_points(t, latency[keep], error[keep])

    def merged(self, other: ParetoCollector) -> ParetoCollector:
        """A new collector holding the front of both; neither input changes."""
        both = ParetoCollector(self.thresholds.shape[1])
        both.add_points(
            np.vstack([self.thresholds, other.thresholds]),
            np.concatenate([self.latency_ms, other.latency_ms]),
            np.concatenate([self.error, other.error]),
        )
        return both

    def to_list(self) -> list[dict]:
        return [
            {
                "thresholds": [float(x) for x in t],
                "expected_latency_ms": float(lat),
                "accuracy": float(1.0 - err),
            }
            for t, lat, err in zip(self.thresholds, self.latency_ms, self.error, strict=True)
        ]


@dataclass(frozen=True)
class FrontPoint:
    thresholds: list[float]
    latency_ms: float
    accuracy: float


def select_point(front: list[dict], objective: Objective) -> tuple[FrontPoint, bool]:
    """The front point the objective prefers, and whether it meets the constraint.

    When no point is feasible, the one closest to feasibility is returned with ``False``.
    """
    if not front:
        raise ValueError("the calibration stores no Pareto front; rerun calibrate.py")
    latency = np.array([p["expected_latency_ms"] for p in front])
    error = 1.0 - np.array([p["accuracy"] for p in front])
    score = objective.score(latency, error)
    best = int(np.argmin(score))
    feasible = bool(objective.violation(latency[best : best + 1], error[best : best + 1])[0] == 0)
    point = front[best]
    return FrontPoint(
        point["thresholds"], point["expected_latency_ms"], point["accuracy"]
    ), feasible
