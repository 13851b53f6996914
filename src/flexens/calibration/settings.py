"""``CalibrateSettings``: the ``calibrate`` config group as one typed, checked object.

Hydra instantiates it from ``conf/calibrate/default.yaml`` (``_target_``), so a bad value
fails with one line before any member is loaded, and the calibration code below the task
layer reads attributes, never a config tree.
"""

from __future__ import annotations

from dataclasses import dataclass

from flexens.calibration.objectives import Objective
from flexens.calibration.risk import PROCEDURES, RISKS
from flexens.calibration.search import make_grid
from flexens.halting import get_criterion

SEARCHES = ("shared", "per_stage")


@dataclass(frozen=True)
class CalibrateSettings:
    """See conf/calibrate/default.yaml for what each setting means."""

    objective: str = "max_drop"
    max_drop: float = 0.01
    delta: float = 0.1
    risk: str = "net_drop"
    procedure: str = "shared"
    opt_fraction: float = 0.5
    unlabelled: str | None = None
    lam: float = 10.0
    budget_ms: float | None = None
    budget_fraction: float | None = None
    criterion: str = "margin"
    search: str = "per_stage"
    grid_step: float = 0.01
    exhaustive_max_evals: int = 20000
    restarts: int = 4
    profile_batch_size: int = 256
    latency_profile: str | None = None
    reprofile: bool = False
    output: str | None = None

    def __post_init__(self) -> None:
        get_criterion(self.criterion)
        make_grid(float(self.grid_step))
        Objective(self.objective, 1.0, 0.0, 1, lam=float(self.lam), max_drop=float(self.max_drop))
        for name, value, allowed in (
            ("search", self.search, SEARCHES),
            ("risk", self.risk, RISKS),
            ("procedure", self.procedure, PROCEDURES),
        ):
            if value not in allowed:
                raise ValueError(f"unknown calibrate.{name} {value!r}; use {' or '.join(allowed)}")
        self._check_numbers()
        if self.unlabelled and self.risk != "disagreement":
            raise ValueError(
                f"calibrate.unlabelled={self.unlabelled!r} has no labels, so accuracy loss "
                "cannot be measured there; certify calibrate.risk=disagreement instead"
            )

    def _check_numbers(self) -> None:
        if not 0 < float(self.delta) < 1:
            raise ValueError(f"calibrate.delta must be in (0, 1), got {self.delta}; e.g. 0.1")
        if self.objective == "max_drop" and not 0 < float(self.max_drop) < 1:
            raise ValueError(
                f"calibrate.max_drop must be in (0, 1) to certify, got {self.max_drop}; "
                "e.g. 0.005 (0.5 pp)"
            )
        if self.objective == "budget" and self.budget_ms is None and self.budget_fraction is None:
            raise ValueError(
                "calibrate.objective=budget needs calibrate.budget_ms=... or "
                "calibrate.budget_fraction=... (of the full ensemble's latency)"
            )
        if isinstance(self.profile_batch_size, bool) or int(self.profile_batch_size) < 1:
            raise ValueError(
                f"calibrate.profile_batch_size must be a whole number >= 1, "
                f"got {self.profile_batch_size!r}"
            )

    def budget(self, full_latency_ms: float) -> float:
        """The expected-latency budget in ms (infinite unless objective=budget)."""
        if self.objective != "budget":
            return float("inf")
        if self.budget_ms is not None:
            return float(self.budget_ms)
        return float(self.budget_fraction) * full_latency_ms

    @property
    def certification(self) -> dict:
        """The settings fixed-sequence testing takes, as :func:`certify` keywords."""
        return {
            "risk": self.risk,
            "procedure": self.procedure,
            "delta": float(self.delta),
            "opt_fraction": float(self.opt_fraction),
            "max_exhaustive_evals": int(self.exhaustive_max_evals),
        }
