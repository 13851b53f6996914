"""Table cells shared by the benchmark reports (``cifar10.py``, ``gpu.py``)."""

from __future__ import annotations


def fmt(value, spec: str = ".3f", suffix: str = "") -> str:
    """``value`` formatted, or an en dash where there is none."""
    return "–" if value is None else f"{value:{spec}}{suffix}"


def gap(measured, expected) -> float | None:
    """Measured over predicted, minus one (None where either is missing)."""
    return None if not measured or not expected else measured / expected - 1.0
