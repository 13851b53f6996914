"""The HTTP side of ``POST /predict``: refuse bad requests, decode images, pick thresholds.

An ASGI middleware in front of LitServe's app, running in the HTTP process. Why here and
not in ``LitAPI.decode_request``: LitServe decodes a whole dynamic batch in the inference
worker and answers *every* request of the batch with the error when one decode raises, so
one truncated upload would fail its innocent neighbours. Refusing at the gate keeps bad
requests out of batches altogether, answers them with a 4xx and a one-line ``detail``
without waking the worker, and overlaps image decoding (HTTP process) with the members'
compute (worker process) on a small machine. The worker receives only decoded pixels and
the thresholds each request is served at, handed to its queue by ``submit``
(:meth:`flexens.serving.transport.FastQueueLitServer.submit`) rather than through
LitServe's FastAPI route, which would parse and serialise every request a second time.

The gate also serves ``GET /metrics``, times every request for the metrics and SLO mode,
applies SLO mode's choice to requests that ask for no operating point of their own, sheds
(503 with ``Retry-After``) what would only wait, past ``serve.max_in_flight`` or past the
SLO at SLO mode's fastest point, and
checks ``X-API-Key`` when ``LIT_SERVER_API_KEY`` is set, as LitServe's route would.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl

import torch
from prometheus_client import CONTENT_TYPE_LATEST

from flexens.images import ImageRejected, ImageTooLarge
from flexens.serving.metrics import ServeMetrics
from flexens.serving.points import SETTINGS, RequestRejected, ServedPoint, ServingFront
from flexens.serving.slo import SloController, SloPolicy
from flexens.serving.transport import WorkerFailed

HOW = 'send an image file\'s bytes, or JSON {"image": "<base64>"}'


def parse_query(query: bytes) -> dict[str, str]:
    """Operating-point settings from the query string (``?max_drop=0.02``)."""
    asked: dict[str, str] = {}
    for key, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if key not in SETTINGS:
            raise RequestRejected(
                400, f"unknown query parameter {key[:40]!r}; use {', '.join(SETTINGS)}"
            )
        if key in asked:
            raise RequestRejected(400, f"query parameter {key} given twice")
        asked[key] = value
    return asked


def parse_request(body: bytes, content_type: str, query: bytes) -> tuple[bytes, dict]:
    """The image bytes and the asked-for operating point of a raw or JSON request."""
    asked: dict = parse_query(query)
    if not body:
        raise RequestRejected(400, f"empty body; {HOW}")
    if content_type.split(";")[0].strip().lower() != "application/json":
        return body, asked
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestRejected(400, f"body is not valid JSON ({error}); {HOW}") from None
    if not isinstance(data, dict) or not isinstance(data.get("image"), str):
        raise RequestRejected(400, f"a JSON body must be an object with an image field; {HOW}")
    unknown = sorted(set(data) - {"image", *SETTINGS})
    if unknown:
        raise RequestRejected(400, f"unknown field(s) {unknown}; use image, {', '.join(SETTINGS)}")
    try:
        image = base64.b64decode(data["image"], validate=True)
    except (binascii.Error, ValueError):
        raise RequestRejected(400, "the image field is not valid base64") from None
    for key in SETTINGS:
        if key in data:
            if isinstance(data[key], bool | dict | list) or data[key] is None:
                raise RequestRejected(422, f"{key} must be a number, got {json.dumps(data[key])}")
            asked[key] = data[key]
    return image, asked


async def read_body(scope: dict, receive: Callable, limit: int) -> bytes:
    """The whole body, refused with a 413 as soon as it is known to exceed ``limit``."""
    too_large = RequestRejected(413, f"body larger than the server's limit of {limit:,} bytes")
    headers = dict(scope["headers"])
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise RequestRejected(400, "client disconnected before sending the body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


RETRY_AFTER_S = 1
"""The ``Retry-After`` of a 503: the server sheds only while a backlog drains, in about a
second at these loads."""


async def reply(
    send: Callable, status: int, body: bytes, content_type: bytes, headers: tuple = ()
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class LoopLag:
    """How late the HTTP process's event loop runs a timer, in ms: what a request that has
    just arrived waits before the gate sees it. A saturated HTTP process (past its capacity
    on a small machine it is the bottleneck) leaves requests in its socket, where no count
    of requests in flight can see them; the loop's lag grows with that backlog. Measured by
    a timer every ``interval_s`` in the running loop, started with the first request."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.ms = 0.0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(self.interval_s)
            self.ms = max(0.0, (loop.time() - start - self.interval_s) * 1e3)


class RequestGate:
    """ASGI middleware: ``POST /predict`` checks and decoding, ``GET /metrics``, SLO mode."""

    def __init__(
        self,
        app,
        *,
        submit: Callable[[dict], Awaitable[dict]],
        front: ServingFront,
        decode: Callable[[bytes], torch.Tensor],
        max_body_bytes: int,
        num_members: int,
        max_in_flight: int | None = None,
        ladder: list[ServedPoint] | None = None,
        slo_policy: SloPolicy | None = None,
        api_key: str | None = None,
        path: str = "/predict",
    ) -> None:
        self.app, self.submit, self.front, self.decode = app, submit, front, decode
        self.path, self.api_key = path, api_key
        self.max_body_bytes, self.max_in_flight = max_body_bytes, max_in_flight
        self.ladder = ladder or [front.default]
        self.controller = SloController(slo_policy) if slo_policy is not None else None
        self.lag = LoopLag()
        self.metrics = ServeMetrics(num_members)
        self.metrics.set_point(self.ladder[0].name, self.ladder[0].expected_ms)
        self.in_flight = 0

    def current_point(self) -> ServedPoint:
        return self.ladder[self.controller.level] if self.controller else self.front.default

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        metrics = scope["path"] == "/metrics" and scope["method"] == "GET"
        if not metrics and (scope["path"] != self.path or scope["method"] != "POST"):
            return await self.app(scope, receive, send)
        if not self._authorised(scope):
            reason = "invalid API key; send the server's key in the X-API-Key header"
            status = await self._refuse(send, 401, reason)
            return None if metrics else self._count(status)
        if metrics:
            if self.controller is not None:
                service = self.controller.service_ms
                self.metrics.loop_lag.set(self.lag.ms / 1e3)
                self.metrics.service_time.set(float("nan") if service is None else service / 1e3)
            body = self.metrics.exposition()
            return await reply(send, 200, body, CONTENT_TYPE_LATEST.encode())
        if self.max_in_flight is not None and self.in_flight >= self.max_in_flight:
            reason = (
                f"server busy: {self.in_flight} requests in flight, the limit is "
                f"{self.max_in_flight} (serve.max_in_flight); retry later"
            )
            return self._count(await self._shed(send, "in_flight", reason))
        if self.controller is not None:
            self.lag.start()
            if not self.controller.admits(self.in_flight, self.lag.ms):
                wait = self.controller.predicted_wait_ms(self.in_flight, self.lag.ms)
                reason = (
                    f"server at its fastest operating point and still over its SLO: a request "
                    f"now would wait about {wait:.0f} ms behind {self.in_flight} others, past "
                    f"serve.slo_ms={self.controller.policy.slo_ms:g}; retry later"
                )
                return self._count(await self._shed(send, "slo", reason))
        start = time.perf_counter()
        self.in_flight += 1
        ahead = self.in_flight
        self.metrics.in_flight.set(self.in_flight)
        try:
            status, members = await self._predict(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.set(self.in_flight)
        elapsed = time.perf_counter() - start
        self._count(status)
        if status == 200:
            self.metrics.latency.observe(elapsed)
            self.metrics.members_used.observe(members)
            self._observe_slo(elapsed * 1e3, ahead)

    async def _predict(self, scope, receive, send) -> tuple[int, int]:
        """Answer one prediction request; returns its status and the members it used."""
        try:
            body = await read_body(scope, receive, self.max_body_bytes)
            content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
            image, asked = parse_request(body, content_type, scope.get("query_string", b""))
            point = self.front.resolve(asked) or self.current_point()
            x = self.decode(image)
        except RequestRejected as error:
            return await self._refuse(send, error.status, error.reason), 0
        except ImageTooLarge as error:
            return await self._refuse(send, 413, str(error)), 0
        except ImageRejected as error:
            return await self._refuse(send, 400, str(error)), 0
        x = x.to(torch.float32).contiguous()
        payload = {
            "x": x.numpy().tobytes(),
            "shape": tuple(x.shape),
            "thresholds": point.thresholds,
            "point": point.name,
            "in_flight": self.in_flight,  # how many the worker may wait for (DrainingLoop)
        }
        try:
            answer = await self.submit(payload)
        except WorkerFailed as error:
            return await self._refuse(send, error.status, error.detail), 0
        await reply(send, 200, json.dumps(answer).encode(), b"application/json")
        return 200, int(answer["members_used"])

    def _authorised(self, scope) -> bool:
        """No key set, or the request's ``X-API-Key`` is it (compared in constant time)."""
        if self.api_key is None:
            return True
        key = dict(scope["headers"]).get(b"x-api-key", b"")
        return hmac.compare_digest(key, self.api_key.encode())

    def _count(self, status: int) -> None:
        self.metrics.requests.labels(status=str(status)).inc()
        if 400 <= status < 500 or status == 503:
            self.metrics.rejected.labels(status=str(status)).inc()

    async def _shed(self, send, why: str, reason: str) -> int:
        """Overload: refuse before reading or decoding anything. A server that decodes every
        arrival while its worker falls behind spends its CPU on requests that will wait
        seconds, and its throughput collapses; a 503 now lets the client retry elsewhere."""
        self.metrics.shed.labels(reason=why).inc()
        retry = ((b"retry-after", str(RETRY_AFTER_S).encode()),)
        return await self._refuse(send, 503, reason, retry)

    async def _refuse(self, send, status: int, reason: str, headers: tuple = ()) -> int:
        body = json.dumps({"detail": " ".join(reason.split())}).encode()
        await reply(send, status, body, b"application/json", headers)
        return status

    def _observe_slo(self, latency_ms: float, ahead: int) -> None:
        if self.controller is None:
            return
        switch = self.controller.observe(time.monotonic(), latency_ms, self.in_flight, ahead)
        if switch is None:
            return
        names = [p.name for p in self.ladder]
        print(switch.describe(names, self.controller.policy.slo_ms), flush=True)
        point = self.ladder[switch.to_level]
        self.metrics.set_point(point.name, point.expected_ms)
        direction = "faster" if switch.to_level > switch.from_level else "slower"
        self.metrics.switches.labels(direction=direction).inc()
