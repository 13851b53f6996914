"""Certificates: what a calibration promises about quality, stored and printed one way.

A certificate is a plain dict in thresholds.json (``certified``, ``risk``, ``epsilon``,
``delta``, ``num_samples`` tested, ``calibration_samples``, ``procedure``, ``upper_bound``
reached by the chosen point, ``observed_risk`` on the tested samples, and ``fallback``, the
reason when the full ensemble is served). Thresholds chosen by λ or a latency budget get
one too, with ``certified: false`` and the calibration-split loss as an estimate.
"""

from __future__ import annotations

from flexens.calibration.risk import (
    PROCEDURE_NAMES,
    RISK_NAMES,
    CertifiedPath,
    loss_table,
    pick_certified,
    samples_needed,
    smallest_certifiable_epsilon,
)
from flexens.calibration.simulate import StageTable


def certification_basis(path: CertifiedPath) -> dict:
    """What every point of a certified front was tested with (stored as ``certification``)."""
    return {
        "risk": path.risk,
        "procedure": path.procedure,
        "delta": path.delta,
        "num_samples": path.num_tested,
        "calibration_samples": path.num_samples,
    }


def certified_thresholds(
    front: list[dict], epsilon: float, basis: dict
) -> tuple[list[float], dict]:
    """The cheapest thresholds of ``front`` certified at ``epsilon``, and their certificate."""
    point = pick_certified(front, epsilon)
    certificate = {
        "certified": True,
        **basis,
        "epsilon": epsilon,
        "upper_bound": point["certified_epsilon"],
        "observed_risk": point["tested_losses"] / basis["num_samples"],
        "fallback": None,
    }
    if point is front[0]:
        certificate["fallback"] = fallback_reason(front, epsilon, basis)
    return point["thresholds"], certificate


def fallback_reason(front: list[dict], epsilon: float, basis: dict) -> str:
    """Why no halting point was certified: too few samples, or too many losses seen."""
    n, delta, what = basis["num_samples"], basis["delta"], RISK_NAMES[basis["risk"]]
    level = delta / 2 if basis["risk"] == "net_drop" else delta  # its loss bound gets δ/2
    needed = samples_needed(epsilon, level)
    if n < needed:
        return (
            f"n = {n:,} tested samples are too few to certify {what} ≤ {pp(epsilon)} at "
            f"{1 - delta:.0%} confidence: the smallest ε they can certify is "
            f"{pp(smallest_certifiable_epsilon(n, level))}, and {pp(epsilon)} needs at "
            f"least {needed:,}; serving the full ensemble"
        )
    least = pp(front[1]["certified_epsilon"]) if len(front) > 1 else "none"
    return (
        f"no halting point is certified at {what} ≤ {pp(epsilon)} with n = {n:,} (the "
        f"smallest certified ε is {least}); serving the full ensemble"
    )


def uncertified(table: StageTable, thresholds: list[float], risk: str, delta: float) -> dict:
    """The honest label of thresholds chosen by λ or a budget: an estimate, not a promise."""
    observed = loss_table(table, risk).evaluate(thresholds).error
    return {
        "certified": False,
        "risk": risk,
        "epsilon": None,
        "delta": delta,
        "num_samples": table.num_samples,
        "calibration_samples": table.num_samples,
        "procedure": None,
        "upper_bound": None,
        "observed_risk": observed,
        "fallback": None,
    }


def pp(fraction: float) -> str:
    return f"{fraction * 100:.2f} pp"


def certificate_line(certificate: dict | None) -> str:
    """The one line every run prints about the quality it promises."""
    if not certificate:
        return "not certified: calibrated before certificates existed; recalibrate"
    what = RISK_NAMES[certificate["risk"]]
    if not certificate["certified"]:
        return (
            f"not certified: {what} {pp(certificate['observed_risk'])} on the "
            f"{certificate['num_samples']:,} calibration samples that chose the thresholds is "
            "an estimate (calibrate.objective=max_drop certifies a bound)"
        )
    if certificate["fallback"]:
        return f"certified: full ensemble, {what} 0 by construction ({certificate['fallback']})"
    procedure = PROCEDURE_NAMES[certificate["procedure"]]
    return (
        f"certified: {what} ≤ {pp(certificate['epsilon'])} with {1 - certificate['delta']:.0%} "
        f"confidence (n = {certificate['num_samples']:,}, {procedure})"
    )


def certificate_metrics(certificate: dict | None) -> dict[str, float]:
    """The certificate's numbers as logger metrics (``certificate/<field>``)."""
    return {
        f"certificate/{k}": float(v)
        for k, v in (certificate or {}).items()
        if isinstance(v, bool | int | float)
    }
