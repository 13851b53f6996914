"""Report plots: each writes a complete PNG atomically and survives degenerate inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from flexens.memo import Memo
from flexens.reporting.plots import (
    _content_key,
    plot_accuracy_vs_latency,
    plot_confidence_histogram,
    plot_pareto_front,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_clean_png(path: Path, expected: Path) -> None:
    assert path == expected
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in path.parent.iterdir()] == [path.name], "temp files left behind"


@pytest.mark.parametrize("all_correct", [False, True], ids=["mixed", "no_wrong"])
def test_confidence_histogram(tmp_path: Path, all_correct: bool) -> None:
    rng = np.random.default_rng(0)
    confidence = rng.beta(5, 1, size=200)
    correct = np.ones(200, bool) if all_correct else confidence > rng.uniform(size=200)
    target = tmp_path / "new" / "hist.png"  # missing parent folder gets created
    out = plot_confidence_histogram(confidence, correct, target, criterion="margin", title="t")
    _assert_clean_png(out, target)


def test_confidence_histogram_rejects_mismatched_shapes(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        plot_confidence_histogram(np.zeros(3), np.zeros(4, bool), tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_accuracy_vs_latency(tmp_path: Path) -> None:
    full = [(2.0, 0.90), (4.0, 0.92), (6.0, 0.93)]
    flexible = {
        "margin": [(2.5, 0.915, "λ=1"), (3.1, 0.925, "λ=10")],
        "entropy": [(2.7, 0.912, "λ=1")],
        "max_prob": [],
    }
    target = tmp_path / "acc_latency.png"
    out = plot_accuracy_vs_latency(target, full, flexible, oracle=(2.1, 0.97))
    _assert_clean_png(out, target)


@pytest.mark.parametrize("n", [1, 6], ids=["single_point", "front"])
def test_pareto_front(tmp_path: Path, n: int) -> None:
    latency = np.linspace(2.0, 6.0, n)[::-1]  # unsorted input is fine
    accuracy = np.linspace(0.90, 0.93, n)[::-1]
    target = tmp_path / "pareto.png"
    out = plot_pareto_front(
        target,
        latency,
        accuracy,
        chosen=(latency[0], accuracy[0]),
        full=(6.0, 0.93),
        oracle=(2.0, 0.97),
    )
    _assert_clean_png(out, target)


def test_overwrite_replaces_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "pareto.png"
    target.write_bytes(b"stale")
    plot_pareto_front(target, np.array([1.0]), np.array([0.5]))
    _assert_clean_png(target, target)


def test_identical_inputs_reuse_the_rendered_png(tmp_path: Path, monkeypatch) -> None:
    latency, accuracy = np.array([1.0, 2.0, 3.0]), np.array([0.8, 0.9, 0.95])
    memo = Memo(keep=4)
    first = plot_pareto_front(tmp_path / "a.png", latency, accuracy, chosen=(2.0, 0.9), memo=memo)

    def no_drawing(*args, **kwargs):
        raise AssertionError("drew a figure it had already rendered")

    monkeypatch.setattr(Figure, "savefig", no_drawing)
    again = plot_pareto_front(
        tmp_path / "b.png", latency.copy(), accuracy, chosen=(2.0, 0.9), memo=memo
    )
    assert again.read_bytes() == first.read_bytes()
    with pytest.raises(AssertionError, match="already rendered"):  # another chosen point draws
        plot_pareto_front(tmp_path / "c.png", latency, accuracy, chosen=(3.0, 0.95), memo=memo)
    with pytest.raises(AssertionError, match="already rendered"):  # no memo: always draws
        plot_pareto_front(tmp_path / "d.png", latency, accuracy, chosen=(2.0, 0.9))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]


def test_inputs_that_differ_only_inside_a_nested_array_get_different_keys() -> None:
    big = np.linspace(0.0, 1.0, 5000)
    changed = big.copy()
    changed[2500] = 0.0  # repr() of either array elides this element
    assert repr([big]) == repr([changed])
    assert _content_key("f", {"points": [big]}) != _content_key("f", {"points": [changed]})
    assert _content_key("f", {"points": [big]}) == _content_key("f", {"points": [big.copy()]})
