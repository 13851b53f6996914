"""Locust user for ``benchmarks/serve_load.py``: posts labelled images to ``/predict``.

Configured through environment variables (locust runs this file in its own process):
``FLEXENS_LOAD_IMAGES`` (JSON list of ``[path, label]``), ``FLEXENS_LOAD_RATE`` (requests/s
per user, 0: back to back), ``FLEXENS_LOAD_MAX`` (requests in all, then stop) and
``FLEXENS_LOAD_OUT`` (where the per-request records go as JSON when the run ends).
"""

from __future__ import annotations

import json
import os
import random
import time
from itertools import count
from pathlib import Path

import gevent
from locust import FastHttpUser, constant, constant_throughput, events, task

IMAGES = [
    (Path(p).read_bytes(), label)
    for p, label in json.loads(Path(os.environ["FLEXENS_LOAD_IMAGES"]).read_text())
]
RATE = float(os.environ.get("FLEXENS_LOAD_RATE", "0"))
LIMIT = int(os.environ.get("FLEXENS_LOAD_MAX", "100000"))
TICKETS = count()
RECORDS: list[tuple[float, float, int, int, int, str]] = []
"""(start s, latency ms, status, correct, members used, operating point) per request."""


class ImagePoster(FastHttpUser):
    wait_time = constant_throughput(RATE) if RATE > 0 else constant(0)

    def on_start(self) -> None:
        if RATE > 0:  # spread the users' first requests: an open loop, not a burst
            gevent.sleep(random.uniform(0, 1.0 / RATE))

    @task
    def predict(self) -> None:
        ticket = next(TICKETS)
        if ticket >= LIMIT:
            self.environment.runner.quit()
            return
        body, label = IMAGES[ticket % len(IMAGES)]
        start = time.perf_counter()
        with self.client.post("/predict", data=body, catch_response=True) as response:
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
    Path(os.environ["FLEXENS_LOAD_OUT"]).write_text(json.dumps(RECORDS))
