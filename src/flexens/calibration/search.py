"""Threshold search over a grid: shared, exhaustive per-stage, and coordinate descent.

The workhorse is :func:`sweep_stage`: with every threshold but ``T_k`` fixed, it scores all
grid values of ``T_k`` exactly in ``O(S + G)`` after one ``O(N·S)`` pass. Samples that halt
before stage k are unaffected by ``T_k``; a sample that reaches stage k either halts there
(when its confidence exceeds ``T_k``) or continues to a fixed exit decided by the later
thresholds, so the totals for all grid values are suffix sums over a histogram of where
each sample's confidence falls in the grid.

Every scored point is also handed to a :class:`ParetoCollector`, so a calibration stores the
non-dominated (latency, accuracy) threshold sets it met along the way.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from flexens.calibration.objectives import Objective
from flexens.calibration.pareto import ParetoCollector
from flexens.calibration.simulate import StageTable


def make_grid(step: float) -> np.ndarray:
    """Thresholds ``0, step, 2·step, …, 1`` (1 itself always included: never halt)."""
    if not 0 < step <= 1:
        raise ValueError(f"calibrate.grid_step must be in (0, 1], got {step}")
    count = int(round(1.0 / step))
    grid = np.round(np.arange(count + 1) * step, 10)
    grid = grid[grid < 1.0]
    return np.append(grid, 1.0)


def simulate_exits(table: StageTable, thresholds: np.ndarray) -> np.ndarray:
    """Exit stage per sample; the float32 comparison matches :func:`halting.should_halt`."""
    t = np.asarray(thresholds, dtype=np.float32)[:, None]
    halts = table.confidence[:-1] > t
    halts = np.vstack([halts, np.ones((1, table.num_samples), dtype=bool)])
    return halts.argmax(axis=0)


@dataclass
class SearchResult:
    thresholds: np.ndarray
    score: float
    method: str
    evaluations: int
    pareto: ParetoCollector = field(repr=False)


class ThresholdSearch:
    """Grid search of ``T_1..T_{N-1}`` on one :class:`StageTable` for one objective."""

    def __init__(
        self,
        table: StageTable,
        grid: np.ndarray,
        objective: Objective,
        pareto: ParetoCollector | None = None,
    ) -> None:
        if table.num_members < 2:
            raise ValueError("threshold search needs at least two members")
        self.table = table
        self.grid = np.asarray(grid, dtype=np.float64)
        self._grid32 = self.grid.astype(np.float32)
        self.objective = objective
        self.pareto = pareto if pareto is not None else ParetoCollector(table.num_members - 1)
        self.evaluations = 0
        self._samples = np.arange(table.num_samples)
        self._cum_cost = table.cumulative_cost_ms
        self._wrong = ~table.correct
        # Grid slot of every stage confidence: a sample halts at grid index g iff g < slot.
        self._slot = np.searchsorted(self._grid32, table.confidence[:-1], side="left")

    # -- scoring ------------------------------------------------------------------------
    def _record(self, base: np.ndarray, stage: int, latency: np.ndarray, error: np.ndarray):
        self.evaluations += len(latency)
        self.pareto.add_sweep(base, stage, self.grid, latency, error)
        return self.objective.score(latency, error)

    def sweep_stage(self, thresholds: np.ndarray, stage: int) -> tuple[np.ndarray, np.ndarray]:
        """Latency and error of every grid value of ``T_stage``, the rest held fixed."""
        t = np.array(thresholds, dtype=np.float64)
        t[stage] = np.inf  # nobody halts at `stage`: later exits are the continuation
        exits = simulate_exits(self.table, t)
        n = self.table.num_samples
        reach = exits > stage
        cont = exits[reach]
        idx = self._samples[reach]
        d_cost = self._cum_cost[stage] - self._cum_cost[cont]
        d_wrong = self._wrong[stage, idx].astype(np.float64) - self._wrong[cont, idx]
        slots = self._slot[stage, idx]
        g = len(self.grid)
        # suffix(g) = sum of deltas of samples with slot > g, i.e. samples halting at g.
        cost_hist = np.bincount(slots, weights=d_cost, minlength=g + 1)
        wrong_hist = np.bincount(slots, weights=d_wrong, minlength=g + 1)
        cost_suffix = cost_hist.sum() - np.cumsum(cost_hist)[:g]
        wrong_suffix = wrong_hist.sum() - np.cumsum(wrong_hist)[:g]
        base_cost = self._cum_cost[exits].sum()
        base_wrong = self._wrong[exits, self._samples].sum()
        return (base_cost + cost_suffix) / n, (base_wrong + wrong_suffix) / n

    def _best_for_stage(self, thresholds: np.ndarray, stage: int) -> tuple[int, float]:
        latency, error = self.sweep_stage(thresholds, stage)
        score = self._record(thresholds, stage, latency, error)
        best = int(np.argmin(score))
        current = int(np.argmin(np.abs(self.grid - thresholds[stage])))
        # Keep the current value on a tie, so coordinate descent cannot cycle.
        if score[current] <= score[best]:
            best = current
        return best, float(score[best])

    # -- strategies ---------------------------------------------------------------------
    def shared(self) -> SearchResult:
        """One threshold for every stage, over the full grid."""
        d = self.table.num_members - 1
        latency, error = np.empty(len(self.grid)), np.empty(len(self.grid))
        for i, value in enumerate(self.grid):
            exits = simulate_exits(self.table, np.full(d, value))
            latency[i] = self._cum_cost[exits].mean()
            error[i] = self._wrong[exits, self._samples].mean()
        self.evaluations += len(self.grid)
        self.pareto.add_points(np.repeat(self.grid[:, None], d, axis=1), latency, error)
        score = self.objective.score(latency, error)
        best = int(np.argmin(score))
        return self._result(np.full(d, self.grid[best]), float(score[best]), "shared")

    def exhaustive(self) -> SearchResult:
        """Every combination: the outer stages enumerated, the last one swept exactly."""
        d = self.table.num_members - 1
        best_t, best_score = None, np.inf
        for prefix in itertools.product(self.grid, repeat=d - 1):
            t = np.array([*prefix, 1.0])
            latency, error = self.sweep_stage(t, d - 1)
            score = self._record(t, d - 1, latency, error)
            i = int(np.argmin(score))
            if score[i] < best_score:
                best_score = float(score[i])
                best_t = np.array([*prefix, self.grid[i]])
        return self._result(best_t, best_score, "exhaustive")

    def coordinate_descent(self, starts: list[np.ndarray], max_passes: int = 50) -> SearchResult:
        """Optimise one stage at a time until a full pass changes nothing, from each start."""
        best_t, best_score = None, np.inf
        for start in starts:
            t = self._snap(start)
            score = np.inf
            for _ in range(max_passes):
                changed = False
                for stage in range(len(t)):
                    g, score = self._best_for_stage(t, stage)
                    if self.grid[g] != t[stage]:
                        t[stage] = self.grid[g]
                        changed = True
                if not changed:
                    break
            if score < best_score:
                best_t, best_score = t.copy(), score
        return self._result(best_t, best_score, "coordinate_descent")

    def per_stage(self, max_exhaustive_evals: int, restarts: int, seed: int = 0) -> SearchResult:
        """The paper's per-stage thresholds: exhaustive if small enough, else descent."""
        d = self.table.num_members - 1
        if len(self.grid) ** d <= max_exhaustive_evals:
            return self.exhaustive()
        shared = self.shared()
        rng = np.random.default_rng(seed)
        starts = [shared.thresholds, np.ones(d)] + [
            rng.choice(self.grid, d) for _ in range(restarts)
        ]
        result = self.coordinate_descent(starts)
        if shared.score < result.score:
            return self._result(shared.thresholds, shared.score, "coordinate_descent")
        return result

    def _snap(self, thresholds: np.ndarray) -> np.ndarray:
        idx = np.abs(self.grid[None, :] - np.asarray(thresholds)[:, None]).argmin(axis=1)
        return self.grid[idx].astype(np.float64)

    def _result(self, thresholds: np.ndarray, score: float, method: str) -> SearchResult:
        return SearchResult(
            np.asarray(thresholds, dtype=np.float64), score, method, self.evaluations, self.pareto
        )
