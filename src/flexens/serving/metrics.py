"""Prometheus metrics of one server, in a registry of its own (no process-global state).

They live in the HTTP process, which sees every request from arrival to answer: its
latency is queueing + batching + compute, the figure the SLO is about.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class ServeMetrics:
    """Requests, latency, members used, current operating point, rejections, sheds, SLO switches."""

    def __init__(self, num_members: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "flexens_requests",
            "Answered prediction requests, by HTTP status",
            ["status"],
            registry=r,
        )
        self.rejected = Counter(
            "flexens_rejected_requests",
            "Requests refused with a 4xx (bad request) or 503 (shed), by status",
            ["status"],
            registry=r,
        )
        self.latency = Histogram(
            "flexens_request_latency_seconds",
            "Request latency in the server: queueing, batching and compute",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.members_used = Histogram(
            "flexens_members_used",
            "Members each answer used",
            buckets=tuple(float(k) for k in range(1, num_members + 1)),
            registry=r,
        )
        self.point = Gauge(
            "flexens_operating_point",
            "1 for the operating point requests without their own get",
            ["point", "expected_ms"],
            registry=r,
        )
        self.shed = Counter(
            "flexens_shed_requests",
            "Requests refused with a 503 before their body was read, by reason: in_flight "
            "(over serve.max_in_flight) or slo (predicted to wait past the SLO at the "
            "fastest operating point)",
            ["reason"],
            registry=r,
        )
        self.in_flight = Gauge("flexens_in_flight", "Requests being answered", registry=r)
        self.loop_lag = Gauge(
            "flexens_event_loop_lag_seconds",
            "How late the HTTP process's event loop last ran a timer: what a new request waits "
            "before the gate sees it (measured in SLO mode)",
            registry=r,
        )
        self.service_time = Gauge(
            "flexens_slo_service_time_seconds",
            "SLO mode's per-request service time at the current point, from which it predicts "
            "a newcomer's wait (NaN until measured)",
            registry=r,
        )
        self.switches = Counter(
            "flexens_slo_switches", "SLO mode changes of operating point", ["direction"], registry=r
        )

    def set_point(self, name: str, expected_ms: float) -> None:
        self.point.clear()
        self.point.labels(point=name, expected_ms=f"{expected_ms:.4g}").set(1)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
