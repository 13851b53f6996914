"""SLO mode: step to a faster operating point when the p99 latency nears the SLO, and back.

The controller is a plain class with no clock, thread or I/O: the server feeds it one
observation per answered request (the time it was answered, its queueing + compute latency
and how many requests were in flight) and applies the level it returns. So its decisions on
a latency trace are a pure function of that trace, and the unit tests replay synthetic traces.

Hysteresis keeps it from flapping: it steps *up* (faster) when the window's p99 passes
``step_up_at × slo``, but steps *down* only when the p99, scaled by how much dearer the
slower point is per image, would still sit below ``step_down_at × slo``; after every switch
it holds for ``hold_s`` and forgets the window, so the next decision is judged on latencies
of the new point only (requests queued under the old one would otherwise trigger a second
step for the same burst).

At the fastest point there is nowhere left to step, and past its capacity the queue, and
every request's wait, grows without bound. There the controller *sheds*: a request that
would wait past ``shed_at × slo`` is refused at once (the gate answers 503), so what it
admits waits about the SLO rather than seconds, and a client learns at once to retry
elsewhere. The wait is predicted from Little's law: each answered request's
latency over the requests in the server when it arrived (itself included) is its per-request
service time at the current point; a newcomer behind ``n`` requests waits about
``(n + 1)`` times the window's median of it, plus the HTTP process's own backlog: when that
process is saturated, requests wait in its socket before the gate sees them, and the gate
measures that wait as the event loop's lag (:class:`flexens.serving.gate.LoopLag`). A
request that finds the server empty is always admitted, so the estimate keeps being fed.

The window's p99 is judged at most 20 times per window, not at every request: sorting a
window of a few hundred latencies per answered request would cost the HTTP process, the
bottleneck under overload, most at exactly the moment it can least afford it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Switch:
    """One change of operating point, with the load that caused it."""

    at_s: float
    from_level: int
    to_level: int
    p99_ms: float
    rate_rps: float
    """Requests answered per second over the window."""
    in_flight: int
    samples: int

    def describe(self, names: Sequence[str], slo_ms: float) -> str:
        direction = "faster" if self.to_level > self.from_level else "slower"
        return (
            f"slo: {names[self.from_level]} -> {names[self.to_level]} ({direction}): p99 "
            f"{self.p99_ms:.1f} ms vs slo {slo_ms:g} ms at {self.rate_rps:.1f} req/s, "
            f"{self.in_flight} in flight ({self.samples} requests in the window)"
        )


@dataclass(frozen=True)
class SloPolicy:
    """When to switch. ``costs`` are the expected ms/image of each level, slowest first."""

    slo_ms: float
    costs: tuple[float, ...]
    window_s: float = 2.0
    min_samples: int = 20
    step_up_at: float = 0.8
    step_down_at: float = 0.5
    hold_s: float = 2.0
    shed_at: float | None = 0.8
    """At the fastest point, refuse a request predicted to wait past ``shed_at × slo_ms``
    (None: never refuse; the queue then grows past the SLO under overload)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.slo_ms) and self.slo_ms > 0):
            raise ValueError(f"serve.slo_ms must be a positive number of ms, got {self.slo_ms}")
        if len(self.costs) < 2:
            raise ValueError("SLO mode needs at least one faster point: set serve.slo.ladder")
        if any(b >= a for a, b in zip(self.costs, self.costs[1:], strict=False)):
            raise ValueError(
                f"each step of serve.slo.ladder must be cheaper than the one before, got "
                f"expected ms/image {[round(c, 4) for c in self.costs]}; drop the repeated steps"
            )
        if not 0 < self.step_down_at < self.step_up_at <= 1:
            raise ValueError(
                "need 0 < serve.slo.step_down_at < serve.slo.step_up_at <= 1, got "
                f"{self.step_down_at} and {self.step_up_at}"
            )
        if self.shed_at is not None and not 0 < self.shed_at <= 1:
            raise ValueError(f"serve.slo.shed_at must be in (0, 1] or null, got {self.shed_at}")
        if self.window_s <= 0 or self.hold_s < 0 or self.min_samples < 1:
            raise ValueError(
                "serve.slo.window_s must be > 0, hold_s >= 0 and min_samples >= 1, got "
                f"{self.window_s}, {self.hold_s}, {self.min_samples}"
            )


CHECKS_PER_WINDOW = 20
"""How often the window's p99 is judged: every ``window_s / CHECKS_PER_WINDOW`` seconds."""


class SloController:
    """Deterministic level selection from observed latencies (level 0: the slowest point),
    and admission at the fastest."""

    def __init__(self, policy: SloPolicy) -> None:
        self.policy = policy
        self.level = 0
        self._window: deque[tuple[float, float, float]] = deque()
        self._last_switch_s = -math.inf
        self._next_check_s = -math.inf
        self._service_ms: float | None = None

    @property
    def levels(self) -> int:
        return len(self.policy.costs)

    @property
    def service_ms(self) -> float | None:
        """Per-request service time at the current point (None until the window has enough)."""
        return self._service_ms

    def predicted_wait_ms(self, in_flight: int, lag_ms: float = 0.0) -> float | None:
        """What a request arriving now, behind ``in_flight`` others, is predicted to wait,
        ``lag_ms`` (the HTTP process's backlog) included."""
        return None if self._service_ms is None else (in_flight + 1) * self._service_ms + lag_ms

    def admits(self, in_flight: int, lag_ms: float = 0.0) -> bool:
        """Whether to take a request arriving behind ``in_flight`` others: always, except at
        the fastest point when its predicted wait passes ``shed_at × slo_ms``."""
        p = self.policy
        wait = self.predicted_wait_ms(in_flight, lag_ms)
        if p.shed_at is None or wait is None or in_flight == 0 or self.level < self.levels - 1:
            return True
        return wait <= p.shed_at * p.slo_ms

    def observe(
        self, now_s: float, latency_ms: float, in_flight: int = 0, ahead: int = 1
    ) -> Switch | None:
        """Record one answered request, which found ``ahead`` requests in the server on
        arrival (itself included); return the switch it triggers, if any."""
        p = self.policy
        self._window.append((now_s, latency_ms, latency_ms / max(ahead, 1)))
        while self._window[0][0] < now_s - p.window_s:
            self._window.popleft()
        if len(self._window) < p.min_samples or now_s < self._next_check_s:
            return None
        self._next_check_s = now_s + p.window_s / CHECKS_PER_WINDOW
        self._service_ms = float(np.median([per for _, _, per in self._window]))
        if now_s - self._last_switch_s < p.hold_s:
            return None
        p99 = float(np.quantile([lat for _, lat, _ in self._window], 0.99))
        target = self.level
        if p99 > p.step_up_at * p.slo_ms and self.level < self.levels - 1:
            target = self.level + 1
        elif self.level > 0:
            slower = p99 * p.costs[self.level - 1] / p.costs[self.level]
            if slower < p.step_down_at * p.slo_ms:
                target = self.level - 1
        if target == self.level:
            return None
        span = max(now_s - self._window[0][0], 1e-9)
        switch = Switch(
            at_s=now_s,
            from_level=self.level,
            to_level=target,
            p99_ms=p99,
            rate_rps=len(self._window) / max(span, p.window_s / 10),
            in_flight=in_flight,
            samples=len(self._window),
        )
        self.level = target
        self._last_switch_s = now_s
        self._window.clear()
        self._service_ms = None  # measured at the old point; the new one is judged afresh
        return switch
