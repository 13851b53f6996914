"""Table cells shared by the benchmark reports (``cifar10.py``, ``gpu.py``)."""

from __future__ import annotations

from flexens.inference import cell


def fmt(value, spec: str = ".3f", suffix: str = "") -> str:
    """``value`` formatted as ``infer.py``'s table does, or an en dash (markdown) where
    there is none."""
    return cell(value, spec, suffix, missing="–")


def gap(measured, expected) -> float | None:
    """Measured over predicted, minus one (None where either is missing)."""
    return None if not measured or not expected else measured / expected - 1.0
