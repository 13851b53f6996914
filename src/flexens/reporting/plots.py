"""Report figures: confidence histograms, accuracy vs latency, and the calibration Pareto front.

Figures are built on :class:`matplotlib.figure.Figure` directly instead of ``pyplot``: no
global figure registry and no backend switching, so plotting is thread-safe and works on
headless machines (PNG output goes through the Agg renderer). Every PNG is written to a
temporary file beside the target and renamed into place, so a reader never sees half an image.
A figure asked for again with the same input and a :class:`~flexens.memo.Memo` is not drawn
again (:func:`reuse_identical`).

Accuracies come in as fractions (0..1) and are drawn in percent.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import io
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from flexens.artifacts import write_bytes
from flexens.memo import Memo

_DPI = 120
_MARKER_KW = {"markersize": 5, "linewidth": 1.5}


def _new_axes(xlabel: str, ylabel: str, title: str | None) -> tuple[Figure, Axes]:
    """One figure, one axes, shared look (size, grid, labels), so all report plots match.

    Fixed margins instead of constrained layout: the legend sits inside the axes, and
    solving the layout was the largest part of drawing a plot, which a λ sweep does per job.
    """
    fig = Figure(figsize=(6.4, 4.4))
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.12, top=0.91)
    ax = fig.add_subplot()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save_png(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG through a temp file + rename: the file is complete or absent."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return write_bytes(path, buffer.getvalue())


def _feed(digest, value) -> None:
    """Hash ``value`` in full: ``repr`` alone would elide the middle of a large array."""
    if isinstance(value, np.ndarray):
        digest.update(f"array{value.dtype}{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, list | tuple):
        digest.update(f"{type(value).__name__}{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    elif isinstance(value, dict):
        digest.update(f"dict{len(value)}".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    else:
        digest.update(repr(value).encode())
    digest.update(b"\0")


def _content_key(name: str, arguments: dict) -> str:
    digest = hashlib.sha256(name.encode())
    _feed(digest, sorted(arguments.items()))
    return digest.hexdigest()


def reuse_identical(plot: Callable[..., Path]) -> Callable[..., Path]:
    """With ``memo=`` a figure is rendered once per distinct input; the same input again
    copies the PNG from the memo. Without one, every call draws.

    A λ sweep draws the same confidence histogram and accuracy-vs-latency curve in every
    job, and drawing (not writing) is what costs: matplotlib takes a few hundred ms per
    figure. Rendering is deterministic, so the copy is byte for byte what a redraw gives.
    """
    signature = inspect.signature(plot)

    @functools.wraps(plot)
    def wrapper(*args, memo: Memo | None = None, **kwargs) -> Path:
        if memo is None:
            return plot(*args, **kwargs)
        arguments = signature.bind(*args, **kwargs).arguments
        path = Path(arguments.pop("path"))
        key = _content_key(plot.__name__, arguments)
        png = memo.get(key)
        if png is not None:
            return write_bytes(path, png)
        out = plot(*args, **kwargs)
        memo.put(key, out.read_bytes())
        return out

    return wrapper


def _pct(points: Sequence[float]) -> np.ndarray:
    return 100.0 * np.asarray(points, dtype=float)


@reuse_identical
def plot_confidence_histogram(
    confidence: np.ndarray,
    correct: np.ndarray,
    path: str | Path,
    criterion: str = "margin",
    title: str | None = None,
) -> Path:
    """Histogram the first member's confidence for right vs wrong calibration predictions.

    This is the picture behind flexible halting (paper Fig. 2): if wrong predictions pile up
    at low confidence and right ones near 1, a threshold can stop early on easy samples.
    Densities are drawn (the wrong set is usually far smaller than the right one, so raw
    counts would flatten it); the counts go into the legend instead.
    """
    confidence = np.asarray(confidence, dtype=float).ravel()
    correct = np.asarray(correct, dtype=bool).ravel()
    if confidence.shape != correct.shape:
        raise ValueError(f"confidence {confidence.shape} and correct {correct.shape} differ")

    fig, ax = _new_axes(f"confidence ({criterion})", "density", title)
    bins = np.linspace(0.0, 1.0, 41)
    for mask, name, color in ((correct, "correct", "tab:blue"), (~correct, "wrong", "tab:red")):
        values = confidence[mask]
        if values.size == 0:  # e.g. no wrong predictions: keep the legend entry, draw nothing
            ax.plot([], [], color=color, label=f"{name} (n=0)")
            continue
        ax.hist(
            np.clip(values, 0.0, 1.0),
            bins=bins,
            density=True,
            alpha=0.5,
            color=color,
            label=f"{name} (n={values.size})",
        )
    ax.set_xlim(0.0, 1.0)
    ax.legend(loc="best")
    return _save_png(fig, path)


@reuse_identical
def plot_accuracy_vs_latency(
    path: str | Path,
    full: list[tuple[float, float]],
    flexible: dict[str, list[tuple[float, float, str]]],
    oracle: tuple[float, float] | None = None,
    latency_label: str = "expected latency (ms / image)",
) -> Path:
    """Compare flexible ensembles against full ensembles of size 1..N on cost and accuracy.

    ``full`` holds (latency, accuracy) per ensemble size; ``flexible`` maps a halting
    criterion to (latency, accuracy, label) points, e.g. one per λ. A flexible series above
    and left of the full-ensemble line is the saving the method is after.
    """
    fig, ax = _new_axes(latency_label, "accuracy (%)", None)
    if full:
        lat, acc = zip(*full, strict=True)
        ax.plot(lat, _pct(acc), "o-", color="black", label="full ensemble", **_MARKER_KW)
        for size, (x, y) in enumerate(zip(lat, _pct(acc), strict=True), start=1):
            ax.annotate(str(size), (x, y), xytext=(0, 6), textcoords="offset points", ha="center")
    for name, points in flexible.items():
        if not points:
            continue
        lat, acc, labels = zip(*points, strict=True)
        (line,) = ax.plot(lat, _pct(acc), "s--", label=name, **_MARKER_KW)
        for x, y, text in zip(lat, _pct(acc), labels, strict=True):
            ax.annotate(
                text,
                (x, y),
                xytext=(-6, 5),  # upper left: flexible series sit above-left of the full line
                textcoords="offset points",
                ha="right",
                fontsize=7,
                color=line.get_color(),
            )
    if oracle is not None:
        ax.plot(
            oracle[0],
            100.0 * oracle[1],
            "*",
            color="gold",
            markeredgecolor="black",
            markersize=14,
            linestyle="none",
            label="oracle",
        )
    ax.margins(x=0.08, y=0.12)  # room for the annotations at the ends
    ax.legend(loc="best")
    return _save_png(fig, path)


@reuse_identical
def plot_pareto_front(
    path: str | Path,
    latency: np.ndarray,
    accuracy: np.ndarray,
    chosen: tuple[float, float] | None = None,
    full: tuple[float, float] | None = None,
    oracle: tuple[float, float] | None = None,
) -> Path:
    """Draw the calibration Pareto front (best accuracy reachable per latency budget).

    The step line makes the trade-off explicit: spending more latency than a front point
    buys nothing until the next one. The chosen operating point, the full ensemble and the
    oracle are marked so one can see how far the pick is from both references.
    """
    latency = np.asarray(latency, dtype=float).ravel()
    accuracy = np.asarray(accuracy, dtype=float).ravel()
    if latency.shape != accuracy.shape:
        raise ValueError(f"latency {latency.shape} and accuracy {accuracy.shape} differ")

    fig, ax = _new_axes("expected latency", "accuracy (%)", "Pareto front")
    order = np.argsort(latency)
    ax.step(
        latency[order], _pct(accuracy[order]), where="post", color="tab:blue", label="Pareto front"
    )
    ax.plot(latency[order], _pct(accuracy[order]), "o", color="tab:blue", markersize=4)
    marks = (
        (chosen, "D", "tab:red", 9, "chosen"),
        (full, "s", "black", 8, "full ensemble"),
        (oracle, "*", "gold", 14, "oracle"),
    )
    for point, marker, color, size, label in marks:
        if point is not None:
            ax.plot(
                point[0],
                100.0 * point[1],
                marker,
                color=color,
                markeredgecolor="black",
                markersize=size,
                linestyle="none",
                label=label,
            )
    ax.margins(x=0.08, y=0.12)
    ax.legend(loc="best")
    return _save_png(fig, path)
