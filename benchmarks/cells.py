"""What the benchmark reports share (``cifar10.py``, ``gpu.py``, ``serve_*.py``, ...): table
cells, the served ensemble's options, and publishing a generated section."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flexens.artifacts import replace_marked_section
from flexens.inference import cell

ROOT = Path(__file__).resolve().parent.parent


def add_served_ensemble(parser: argparse.ArgumentParser) -> None:
    """``--members-dir`` and ``--thresholds``: by default the CIFAR-10 benchmark's members
    at its certified 1 pp point, the ensemble the serving benchmarks serve."""
    parser.add_argument(
        "--members-dir", type=Path, default=ROOT / "outputs/members/cifar10-small_cnn"
    )
    parser.add_argument(
        "--thresholds",
        type=Path,
        default=ROOT / "benchmarks/results/runs/certified_1pp/thresholds.json",
    )


@contextmanager
def one_line_errors() -> Iterator[None]:
    """A missing or bad input file ends a benchmark with flexens' own one-line message."""
    try:
        yield
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None


def publish(section: str, name: str, update_docs: bool) -> None:
    """Print a generated section and, with ``update_docs``, write it between BENCHMARKS.md's
    ``name`` markers."""
    if update_docs:
        replace_marked_section(ROOT / "BENCHMARKS.md", name, section)
    print(section)


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
