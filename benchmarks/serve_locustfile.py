"""Locust user for ``benchmarks/serve_load.py``: posts labelled images to ``/predict``.

Configured through environment variables (locust runs this file in its own process):
``FLEXENS_LOAD_IMAGES`` (JSON list of ``[path, label]``), ``FLEXENS_LOAD_RATE`` (requests/s
per user, 0: back to back), ``FLEXENS_LOAD_MAX`` (requests in all, then stop) and
``FLEXENS_LOAD_OUT`` (where the per-request records go as JSON when the run ends).

With a rate the load is an *open loop*: each user sends at the times of a Poisson process,
every request in a greenlet of its own, whether or not earlier answers came back. A user
that waits for its answer before sending again (locust's ``constant_throughput``) turns
into a closed loop once answers are slow, offering less load exactly when the server
falls behind, and its users fall into step with the server's batches. Requests still
unanswered when the run ends are recorded with their wait so far (status 0).
"""

from __future__ import annotations

import json
import os
import random
import time
from itertools import count
from pathlib import Path

import gevent
from locust import FastHttpUser, constant, events, task

IMAGES = [
    (Path(p).read_bytes(), label)
    for p, label in json.loads(Path(os.environ["FLEXENS_LOAD_IMAGES"]).read_text())
]
RATE = float(os.environ.get("FLEXENS_LOAD_RATE", "0"))
LIMIT = int(os.environ.get("FLEXENS_LOAD_MAX", "100000"))
TICKETS = count()
RECORDS: list[tuple[float, float, int, int, int, str]] = []
"""(start s, latency ms, status, correct, members used, operating point) per request."""


IN_FLIGHT: dict[int, float] = {}
"""Start time of every request sent and not yet answered."""


class ImagePoster(FastHttpUser):
    wait_time = constant(0)
    concurrency = 256  # connections per user: an open loop must not queue in the client

    @task
    def predict(self) -> None:
        if RATE <= 0:
            self.post()
            return
        gevent.sleep(random.expovariate(RATE))
        gevent.spawn(self.post)

    def post(self) -> None:
        ticket = next(TICKETS)
        if ticket >= LIMIT:
            self.environment.runner.quit()
            return
        body, label = IMAGES[ticket % len(IMAGES)]
        start = time.perf_counter()
        IN_FLIGHT[ticket] = start
        with self.client.post("/predict", data=body, catch_response=True) as response:
            IN_FLIGHT.pop(ticket, None)
            latency = (time.perf_counter() - start) * 1e3
            ok = response.status_code == 200
            answer = response.json() if ok else {}
            RECORDS.append(
                (
                    start,
                    latency,
                    response.status_code,
                    int(answer.get("class_name") == label),
                    int(answer.get("members_used", 0)),
                    answer.get("operating_point", ""),
                )
            )
            if not ok:
                response.failure(f"status {response.status_code}")


@events.quitting.add_listener
def _write(environment, **kwargs) -> None:
    now = time.perf_counter()
    waiting = [(start, (now - start) * 1e3, 0, 0, 0, "") for start in IN_FLIGHT.values()]
    Path(os.environ["FLEXENS_LOAD_OUT"]).write_text(json.dumps(RECORDS + waiting))
