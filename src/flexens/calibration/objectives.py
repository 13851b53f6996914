"""What a threshold search minimises.

Every objective scores whole arrays of (expected latency, error) pairs at once, lower is
better, so a search can rank all grid values of one stage in a single vectorised call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INFEASIBLE = 1e6
"""Added to the score of a point that breaks a constraint, plus how far it breaks it."""


@dataclass(frozen=True)
class Objective:
    """``kind`` is ``lambda`` (the paper's L(T)), ``max_drop`` or ``budget``.

    ``lambda``: ``latency/latency_full + λ·(err − err_full)/err_full``. When the full
    ensemble makes no error on the calibration split, ``err_full`` is replaced by one
    sample's worth of error (``1/S``) so the relative term stays finite.
    ``max_drop``: least latency with ``err − err_full ≤ ε`` on the scored samples (an
    empirical choice that overfits them: calibration certifies with
    :mod:`flexens.calibration.risk` instead). ``budget``: least error with expected latency ``≤ budget_ms``.
    """

    kind: str
    latency_full_ms: float
    error_full: float
    num_samples: int
    lam: float = 10.0
    max_drop: float = 0.0
    budget_ms: float = float("inf")

    def __post_init__(self) -> None:
        if self.kind not in ("lambda", "max_drop", "budget"):
            raise ValueError(
                f"unknown objective {self.kind!r}; use calibrate.objective=lambda|max_drop|budget"
            )
        if self.lam < 0 or not np.isfinite(self.lam):
            raise ValueError(f"calibrate.lam must be a finite number >= 0, got {self.lam}")
        if self.max_drop < 0:
            raise ValueError(f"calibrate.max_drop must be >= 0, got {self.max_drop}")
        if not self.budget_ms > 0:
            raise ValueError(f"the latency budget must be > 0 ms, got {self.budget_ms}")

    @property
    def error_scale(self) -> float:
        return max(self.error_full, 1.0 / self.num_samples)

    def allowed_error(self) -> float:
        return self.error_full + self.max_drop

    def violation(self, latency_ms: np.ndarray, error: np.ndarray) -> np.ndarray:
        """How far each point breaks the objective's constraint (0 when it holds)."""
        if self.kind == "max_drop":
            return np.maximum(error - self.allowed_error() - 1e-12, 0.0)
        if self.kind == "budget":
            return np.maximum(latency_ms - self.budget_ms, 0.0) / self.latency_full_ms
        return np.zeros_like(np.asarray(latency_ms, dtype=np.float64))

    def score(self, latency_ms: np.ndarray, error: np.ndarray) -> np.ndarray:
        latency_ms = np.asarray(latency_ms, dtype=np.float64)
        error = np.asarray(error, dtype=np.float64)
        rel_latency = latency_ms / self.latency_full_ms
        if self.kind == "lambda":
            return rel_latency + self.lam * (error - self.error_full) / self.error_scale
        violation = self.violation(latency_ms, error)
        # Ties broken by the other axis, so the search prefers the cheaper/more accurate twin.
        primary = (
            rel_latency + 1e-9 * error if self.kind == "max_drop" else error + 1e-9 * rel_latency
        )
        return np.where(violation > 0, INFEASIBLE + violation, primary)

    def describe(self) -> str:
        if self.kind == "lambda":
            return f"lambda (λ={self.lam:g})"
        if self.kind == "max_drop":
            return f"max_drop (ε={self.max_drop:g})"
        return f"budget ({self.budget_ms:.4g} ms)"
