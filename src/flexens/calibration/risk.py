"""Certified risk control for halting thresholds: Learn-then-Test with fixed-sequence testing.

An empirical optimum over thousands of threshold sets overfits the calibration split: the
thresholds it picks for "at most ε accuracy loss" lose more than ε on new data most of the
time. Learn-then-Test (Angelopoulos et al., arXiv 2110.01052) turns the choice into multiple
hypothesis testing: for each candidate threshold set ``T`` test ``H₀(T): risk(T) > ε`` with a
valid p-value and control the family-wise error; every rejected ``T`` then has
``risk(T) ≤ ε`` simultaneously with probability ``≥ 1 − δ`` over the calibration draw, so
any of them (the cheapest, say) keeps the promise.

* **Losses.** Per sample and stage, a loss in {0, 1} whose mean bounds the accuracy drop
  against the full ensemble: ``drop`` = the running answer is wrong where the full ensemble
  is right (needs labels); ``disagreement`` = the running answer differs from the full
  ensemble's (needs no labels, and bounds the drop too). The last stage *is* the full
  ensemble, so its loss is 0 for both. ``net_drop`` (the default) certifies the drop
  itself, ``P(loss) − P(gain)`` (a gain: right where the full ensemble is wrong), by an
  upper bound of the first minus a lower bound of the second, each at δ/2.
* **p-values.** With binary losses the exact binomial tail is valid:
  ``p = P(Binom(n, ε) ≤ k)`` for ``k`` losses in ``n`` samples (tighter than
  Hoeffding–Bentkus, which LTT needs only for non-binary losses). Its inverse in ε is the
  Clopper–Pearson upper bound, so each candidate gets the smallest ε it is certified at.
* **Family-wise error: fixed-sequence testing** along an order fixed before the tested
  samples are looked at; testing stops at the first non-rejection, so candidate ``i`` is
  certified at ε iff every candidate before it is too: its *certified ε* is the running
  maximum of the upper bounds. Storing that running maximum certifies any ε chosen later
  (``infer.operating_point.max_drop``) without touching the data again.

Two orders are implemented:

* ``shared``: one threshold for every stage, from 1 (never halt) downwards on the whole
  calibration split; the order needs no data at all.
* ``pareto``: Pareto testing (Laufer-Goldshtein et al., ICLR 2023): per-stage threshold sets
  on the (expected latency, loss) front of one part of the split, ordered from safest to
  cheapest, tested on the other part.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from flexens.calibration.objectives import Objective
from flexens.calibration.pareto import ParetoCollector
from flexens.calibration.search import ThresholdSearch, simulate_exits
from flexens.calibration.simulate import StageTable

RISKS = ("drop", "net_drop", "disagreement")
PROCEDURES = ("shared", "pareto")
PROCEDURE_NAMES = {
    "shared": "fixed-sequence, shared threshold",
    "pareto": "Pareto testing, per-stage thresholds",
}
RISK_NAMES = {
    "drop": "accuracy loss",
    "net_drop": "accuracy loss",
    "disagreement": "disagreement with the full ensemble",
}

FRONT_WEIGHTS = tuple(float(w) for w in np.geomspace(0.1, 1000.0, 25))
"""Weights ``w`` of ``latency/latency_full + w·loss`` traced to build the Pareto-testing
candidates: from "latency is all that counts" to "any loss is unaffordable"."""


# -- p-values and bounds ---------------------------------------------------------------------
def binomial_p_value(losses: int | np.ndarray, n: int, epsilon: float | np.ndarray) -> np.ndarray:
    """p-value of ``H₀: risk > ε`` after ``losses`` binary losses in ``n`` samples.

    ``P(Binom(n, ε) ≤ losses)``: under H₀ the true rate exceeds ε, so seeing this few losses
    is at most this likely.
    """
    return stats.binom.cdf(np.asarray(losses), n, epsilon)


def binomial_upper_bound(losses: int | np.ndarray, n: int, delta: float) -> np.ndarray:
    """The smallest ε at which ``H₀: risk > ε`` is rejected at level δ (Clopper–Pearson).

    ``binomial_p_value(losses, n, ε) ≤ δ`` exactly when ``ε ≥`` this bound.
    """
    losses = np.asarray(losses, dtype=np.float64)
    bound = stats.beta.ppf(1.0 - delta, losses + 1.0, np.maximum(n - losses, 1e-300))
    return np.where(losses >= n, 1.0, bound)


def binomial_lower_bound(successes: int | np.ndarray, n: int, delta: float) -> np.ndarray:
    """Clopper–Pearson lower confidence bound at level ``1 − δ`` of a binomial rate."""
    k = np.asarray(successes, dtype=np.float64)
    bound = stats.beta.ppf(delta, np.maximum(k, 1e-300), n - k + 1.0)
    return np.where(k <= 0, 0.0, bound)


def fixed_sequence_rejections(p_values: np.ndarray, delta: float) -> int:
    """How many hypotheses fixed-sequence testing rejects: it stops at the first ``p > δ``."""
    above = np.flatnonzero(np.asarray(p_values) > delta)
    return int(above[0]) if above.size else len(p_values)


def smallest_certifiable_epsilon(n: int, delta: float) -> float:
    """The least ε any halting can be certified at with ``n`` samples (zero losses seen)."""
    return float(1.0 - delta ** (1.0 / n)) if n > 0 else 1.0


def samples_needed(epsilon: float, delta: float) -> int:
    """The fewest samples that could certify ε at all (only if they show zero losses)."""
    return math.ceil(math.log(delta) / math.log1p(-epsilon))


# -- losses ----------------------------------------------------------------------------------
def loss_table(table: StageTable, risk: str) -> StageTable:
    """``table`` with its errors replaced by the risk's losses (``correct`` = no loss).

    ``net_drop`` counts only the losses here (wrong where full is right); its certificate
    subtracts a lower bound of the gains (right where full is wrong), see :func:`certify`.
    """
    if risk in ("drop", "net_drop"):
        loss = ~table.correct & table.correct[-1:]
    elif risk == "disagreement":
        loss = table.predictions != table.predictions[-1:]
    else:
        raise ValueError(f"unknown risk {risk!r}; use calibrate.risk=" + "|".join(RISKS))
    return dataclasses.replace(table, correct=~loss)


def subset(table: StageTable, samples: np.ndarray) -> StageTable:
    return dataclasses.replace(
        table,
        confidence=table.confidence[:, samples],
        correct=table.correct[:, samples],
        predictions=table.predictions[:, samples],
    )


def loss_counts(losses: StageTable, candidates: np.ndarray) -> np.ndarray:
    """Number of losses of every candidate threshold set (rows of ``candidates``)."""
    samples = np.arange(losses.num_samples)
    wrong = ~losses.correct
    return np.array([wrong[simulate_exits(losses, t), samples].sum() for t in candidates])


# -- candidate orders ------------------------------------------------------------------------
def shared_candidates(grid: np.ndarray, num_thresholds: int) -> np.ndarray:
    """One threshold for all stages, from 1 (never halt: the full ensemble) downwards."""
    return np.repeat(np.sort(grid)[::-1, None], num_thresholds, axis=1)


def pareto_candidates(
    losses: StageTable, grid: np.ndarray, max_exhaustive_evals: int
) -> np.ndarray:
    """The (latency, loss) front of ``losses``, from the safest set to the cheapest.

    Each weight of :data:`FRONT_WEIGHTS` runs one per-stage search; every point the searches
    score joins the front, so it is far denser than the weights alone.
    """
    d = losses.num_members - 1
    full_ms = float(losses.cumulative_cost_ms[-1])
    front = ParetoCollector(d)
    front.add_points(np.ones((1, d)), np.array([full_ms]), np.array([losses.full().error]))
    # An exhaustive search scores every threshold set, so one weight yields the whole front.
    exhaustive = len(grid) ** d <= max_exhaustive_evals
    for w in FRONT_WEIGHTS[:1] if exhaustive else FRONT_WEIGHTS:
        objective = Objective(
            "lambda", full_ms, 0.0, losses.num_samples, lam=w / losses.num_samples
        )
        ThresholdSearch(losses, grid, objective, pareto=front).per_stage(max_exhaustive_evals, 0)
    order = np.lexsort((-front.latency_ms, front.error))  # safest first, then the dearer
    return front.thresholds[order]


# -- the certified path ----------------------------------------------------------------------
@dataclass(frozen=True)
class CertifiedPath:
    """Candidate threshold sets in testing order, each with the least ε it is certified at.

    ``certified_epsilon[i]`` is the running maximum of the Clopper–Pearson bounds of
    candidates ``0..i`` on the ``num_tested`` tested samples: fixed-sequence testing at any
    ε rejects exactly the candidates whose certified ε is ``≤ ε``.
    """

    risk: str
    procedure: str
    delta: float
    num_tested: int
    num_samples: int
    thresholds: np.ndarray
    losses: np.ndarray
    certified_epsilon: np.ndarray

    def certified(self, epsilon: float) -> np.ndarray:
        """Indices of the candidates certified at ``epsilon``."""
        return np.flatnonzero(self.certified_epsilon <= epsilon)


def risk_bounds(
    tested: StageTable, tested_table: StageTable, candidates: np.ndarray, risk: str, delta: float
) -> tuple[np.ndarray, np.ndarray]:
    """Loss counts of each candidate on the tested samples and their (1 − δ) upper bounds.

    For ``net_drop``: accuracy drop = P(loss) − P(gain) ≤ upper(loss, δ/2) − lower(gain, δ/2),
    both bounds holding together with probability ≥ 1 − δ (union bound); the count returned
    is losses minus gains.
    """
    counts = loss_counts(tested, candidates)
    n = tested.num_samples
    if risk != "net_drop":
        return counts, binomial_upper_bound(counts, n, delta)
    right = tested_table.correct
    gains = dataclasses.replace(tested_table, correct=~(right & ~right[-1:]))
    gain_counts = loss_counts(gains, candidates)
    bounds = binomial_upper_bound(counts, n, delta / 2) - binomial_lower_bound(
        gain_counts, n, delta / 2
    )
    return counts - gain_counts, np.maximum(bounds, 0.0)


def certify(
    table: StageTable,
    risk: str,
    procedure: str,
    delta: float,
    grid: np.ndarray,
    split_seed: int = 0,
    opt_fraction: float = 0.5,
    max_exhaustive_evals: int = 20000,
) -> CertifiedPath:
    """Run fixed-sequence testing of ``procedure``'s candidates on ``table``'s samples."""
    if not 0 < delta < 1:
        raise ValueError(f"calibrate.delta must be in (0, 1), got {delta}")
    if procedure not in PROCEDURES:
        raise ValueError(
            f"unknown certification procedure {procedure!r}; use calibrate.procedure="
            + "|".join(PROCEDURES)
        )
    losses = loss_table(table, risk)
    if procedure == "shared":
        tested, tested_table = losses, table
        candidates = shared_candidates(grid, table.num_members - 1)
    else:
        if not 0 < opt_fraction < 1:
            raise ValueError(f"calibrate.opt_fraction must be in (0, 1), got {opt_fraction}")
        order = np.random.default_rng(split_seed).permutation(table.num_samples)
        n_opt = int(round(opt_fraction * table.num_samples))
        if n_opt < 1 or n_opt >= table.num_samples:
            raise ValueError(
                f"{table.num_samples} calibration samples are too few to split for Pareto "
                "testing; use calibrate.procedure=shared"
            )
        ranked = table if risk == "net_drop" else losses  # net drop ranks like plain error
        candidates = pareto_candidates(subset(ranked, order[:n_opt]), grid, max_exhaustive_evals)
        tested, tested_table = subset(losses, order[n_opt:]), subset(table, order[n_opt:])
    counts, bounds = risk_bounds(tested, tested_table, candidates, risk, delta)
    return CertifiedPath(
        risk=risk,
        procedure=procedure,
        delta=delta,
        num_tested=tested.num_samples,
        num_samples=table.num_samples,
        thresholds=candidates,
        losses=counts,
        certified_epsilon=np.maximum.accumulate(bounds),
    )


def certified_front(path: CertifiedPath, table: StageTable) -> list[dict]:
    """The certified operating points worth keeping, from the full ensemble to the cheapest.

    The full ensemble comes first, certified at ε = 0 (its loss against itself is zero by
    definition). A candidate follows only if it is cheaper on ``table`` than every point
    before it, so the list runs up in certified ε and down in expected latency, and
    :func:`pick_certified` finds the cheapest point certified at any ε. Picking among
    certified candidates by data (the latency here) keeps the guarantee: with probability
    ``≥ 1 − δ`` every certified candidate keeps it at once.
    """
    cost = table.cumulative_cost_ms
    samples = np.arange(table.num_samples)
    front = [
        {
            "thresholds": [1.0] * (table.num_members - 1),
            "certified_epsilon": 0.0,
            "tested_losses": 0,
            "expected_latency_ms": float(cost[-1]),
            "avg_members": float(table.num_members),
        }
    ]
    for t, eps, losses in zip(path.thresholds, path.certified_epsilon, path.losses, strict=True):
        exits = simulate_exits(table, t)
        latency = float(cost[exits].mean())
        if latency < front[-1]["expected_latency_ms"] - 1e-12 and eps < 1.0:
            front.append(
                {
                    "thresholds": [float(x) for x in t],
                    "certified_epsilon": float(eps),
                    "tested_losses": int(losses),
                    "expected_latency_ms": latency,
                    "avg_members": float((exits[samples] + 1).mean()),
                }
            )
    return front


def pick_certified(front: list[dict], epsilon: float) -> dict:
    """The cheapest point of :func:`certified_front` certified at ``epsilon``."""
    return [p for p in front if p["certified_epsilon"] <= epsilon][-1]
