"""Table cells shared by the benchmark reports (``cifar10.py``, ``gpu.py``, ...)."""

from __future__ import annotations

from pathlib import Path

from flexens.inference import cell

ROOT = Path(__file__).resolve().parent.parent


def repo_path(path: Path) -> str:
    """``path`` relative to the checkout where it lies inside it, as a command names it."""
    path = path.resolve()
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def fmt(value, spec: str = ".3f", suffix: str = "") -> str:
    """``value`` formatted as ``infer.py``'s table does, or an en dash (markdown) where
    there is none."""
    return cell(value, spec, suffix, missing="–")


def gap(measured, expected) -> float | None:
    """Measured over predicted, minus one (None where either is missing)."""
    return None if not measured or not expected else measured / expected - 1.0
