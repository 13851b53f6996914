"""serve.py: the real server on a loopback port, per-request operating points, bad requests,
and the SLO controller on synthetic latency traces."""

from __future__ import annotations

import base64
import csv
import functools
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import ROOT, run_script
from flexens.ensemble import run_flexible
from flexens.halting import get_criterion
from flexens.serving.slo import SloController, SloPolicy

MEMBERS = "members/digits-small_cnn"
STARTUP_S = 120


# -- batched halting with per-sample thresholds ---------------------------------------------
def test_a_mixed_batch_answers_every_sample_as_it_would_alone(one_thread):
    """Per-sample thresholds: sample i of the batch halts where it halts alone with its set.

    Predictions and exit stages are equal; probabilities agree to float rounding only,
    because a member's matrix product over 64 rows is not bit-identical to one over 1 row
    (that is true of any batching, shared thresholds included).
    """
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Linear(6, 5)).eval() for _ in range(4)]
    x = torch.randn(64, 6)
    rows = torch.rand(64, 3).to(torch.float64)
    rows[::4] = torch.tensor([0.83, 0.1, 0.0], dtype=torch.float64)  # a repeated, shared point
    criterion = get_criterion("margin")
    with torch.no_grad():
        mixed = run_flexible(members, x, rows, criterion)
        for i in range(len(x)):
            alone = run_flexible(members, x[i : i + 1], rows[i].tolist(), criterion)
            for key in ("prediction", "exit_stage"):
                assert torch.equal(getattr(mixed, key)[i], getattr(alone, key)[0]), (key, i)
            for key in ("confidence", "probs"):
                got, want = getattr(mixed, key)[i], getattr(alone, key)[0]
                torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert len(set(mixed.exit_stage.tolist())) == 4  # the rows really halt differently


def test_per_sample_thresholds_on_a_value_float32_rounds_up_decide_as_a_shared_set(one_thread):
    """float32(0.1) > 0.1: a row must compare as the shared Python float does, not in float64."""
    confidence_at = torch.tensor(np.float32(0.1))

    class Fixed(nn.Module):  # a member whose margin is exactly float32(0.1)
        def forward(self, x):
            p = torch.tensor([0.55, 0.45]).expand(x.shape[0], 2)
            return p.log()

    members = [Fixed(), Fixed()]
    margin = get_criterion("margin")
    for batch in (1, 2):  # the batch-of-one path and the batched one
        x = torch.zeros(batch, 1)
        shared = run_flexible(members, x, [0.1], margin)
        rows = torch.full((batch, 1), 0.1, dtype=torch.float64)
        per_row = run_flexible(members, x, rows, margin)
        assert shared.confidence.dtype == confidence_at.dtype
        assert torch.equal(shared.exit_stage, per_row.exit_stage)


# -- SLO controller -------------------------------------------------------------------------
POLICY = SloPolicy(slo_ms=100.0, costs=(12.0, 6.0, 3.0), window_s=2.0, min_samples=10, hold_s=2.0)


def replay(controller: SloController, trace: list[tuple[float, float]]) -> list:
    return [s for t, lat in trace if (s := controller.observe(t, lat, in_flight=4)) is not None]


def steady(start: float, seconds: float, rate: float, latency: float, jitter: float = 0.0):
    rng = np.random.default_rng(int(start * 10 + latency))
    times = np.arange(start, start + seconds, 1.0 / rate)
    return [(float(t), float(latency + jitter * rng.standard_normal())) for t in times]


# -- LitServe plumbing ------------------------------------------------------------------------
def test_responses_cross_the_pipe_from_a_worker_to_the_http_process():
    """fast_queue's response transport as the processes see it: the worker's copy (as
    spawned with it) holds the write ends only; the HTTP process reads whole messages,
    however the pipe's bytes arrive, and an answer too large for one atomic write becomes a
    500 that says why."""
    import asyncio
    import os
    import select
    from queue import Empty

    from litserve.utils import LitAPIStatus, LoopResponseType

    from flexens.serving.transport import PipeTransport, WorkerFailed, _frame

    transport = PipeTransport.opened(2)
    rebuild, args = transport.__reduce__()  # what a spawned worker is given
    assert rebuild is PipeTransport and args == ([], transport.writers)
    worker = rebuild(*args)
    answers = [
        (f"uid-{i}", ({"class_index": i}, LitAPIStatus.OK, LoopResponseType.REGULAR, 0))
        for i in range(3)
    ]
    huge = (
        "uid-huge",
        ({"x": "y" * select.PIPE_BUF}, LitAPIStatus.OK, LoopResponseType.REGULAR, 1),
    )

    async def receive():
        for answer in answers[:2]:
            worker.send(answer, consumer_id=1)
        split = _frame(answers[2])  # one message in two writes: read when it is whole
        os.write(transport.writers[1].fileno(), split[:5])
        first = [await transport.areceive(1), await transport.areceive(1)]
        with pytest.raises(Empty):
            await transport.areceive(1, timeout=0.05)
        os.write(transport.writers[1].fileno(), split[5:])
        worker.send(huge, consumer_id=1)
        return first + [await transport.areceive(1), await transport.areceive(1)]

    got = asyncio.run(receive())
    assert got[:3] == answers
    uid, (error, status, response_type, worker_id) = got[3]
    assert (uid, status, response_type, worker_id) == (
        "uid-huge",
        LitAPIStatus.ERROR,
        LoopResponseType.REGULAR,
        1,
    )
    failure = WorkerFailed.from_response(error)
    assert failure.status == 500 and "over the transport's" in failure.detail


def test_the_endpoint_guard_is_awaited_not_run_in_a_thread():
    """Without an API key LitServe's no-op guard is synchronous (a thread hop per request);
    the server's is a coroutine, and an API's own ``authorize`` still wins."""
    import inspect

    import litserve as ls

    from flexens.serving.transport import FastQueueLitServer

    class Echo(ls.LitAPI):
        def setup(self, device):
            pass

        def predict(self, x):
            return x

    class Guarded(Echo):
        def authorize(self):
            pass

    assert inspect.iscoroutinefunction(FastQueueLitServer(Echo()).setup_auth())
    guarded = Guarded()
    assert FastQueueLitServer(guarded).setup_auth(guarded) == guarded.authorize


def test_the_main_process_does_not_ask_to_die_with_its_parent(monkeypatch):
    """die_with_parent is for LitServe's children: in serve.py's own process (where a
    threaded HTTP server would call it) it must not tie the server to its shell."""
    import ctypes

    from flexens.serving.transport import die_with_parent

    def no_prctl(*args):
        raise AssertionError("prctl called in the main process")

    monkeypatch.setattr(ctypes, "CDLL", no_prctl)
    die_with_parent()


def test_over_max_in_flight_a_request_gets_503_before_its_body_is_read():
    """Load shedding: at the limit the gate answers 503 at once; nothing is read, decoded or
    handed to LitServe, and the refusal is counted."""
    import asyncio

    from flexens.serving.gate import RequestGate
    from flexens.serving.points import ServedPoint

    point = ServedPoint("calibrated", (0.5,), 1.0, False, None, None)
    touched = []

    async def app(scope, receive, send):
        touched.append("app")

    def decode(data):
        touched.append("decode")

    async def submit(payload):
        touched.append("submit")

    gate = RequestGate(
        app, submit=submit, front=None, decode=decode, max_body_bytes=100, num_members=2,
        max_in_flight=3, ladder=[point],
    )  # fmt: skip
    gate.in_flight = 3
    sent = []

    async def receive():
        touched.append("receive")

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": "/predict", "method": "POST", "headers": []}
    asyncio.run(gate(scope, receive, send))
    assert sent[0]["status"] == 503 and touched == []
    assert (b"retry-after", b"1") in sent[0]["headers"]
    detail = json.loads(sent[1]["body"])["detail"]
    assert "3 requests in flight" in detail and "serve.max_in_flight" in detail
    assert gate.in_flight == 3
    text = gate.metrics.exposition().decode()
    assert 'flexens_rejected_requests_total{status="503"} 1.0' in text
    assert 'flexens_shed_requests_total{reason="in_flight"} 1.0' in text


def test_at_the_fastest_point_slo_mode_sheds_a_request_that_would_wait_past_the_slo():
    """The gate asks SLO mode before reading anything: behind too many requests at the
    fastest point the answer is a 503 with the predicted wait, and the shed is counted;
    /metrics shows the service time the prediction uses."""
    import asyncio

    from flexens.serving.gate import RequestGate
    from flexens.serving.points import ServedPoint

    points = [ServedPoint(n, (0.5,), c, False, None, None) for n, c in (("a", 2.0), ("b", 1.0))]
    touched = []

    async def submit(payload):
        touched.append("submit")
        return {"members_used": 1}

    gate = RequestGate(
        None, submit=submit, front=_Front(points[0]), decode=lambda d: torch.zeros(1, 2, 2),
        max_body_bytes=100, num_members=2, ladder=points,
        slo_policy=SloPolicy(slo_ms=100.0, costs=(2.0, 1.0), min_samples=10),
    )  # fmt: skip
    controller = gate.controller
    controller.level = 1
    for i in range(10):  # answered in 40 ms behind 4 requests each: 10 ms per request
        controller.observe(0.01 * i, 40.0, in_flight=4, ahead=4)
    assert controller.service_ms == pytest.approx(10.0)
    gate.in_flight = 8  # a newcomer would wait about 90 ms > 0.8 × 100 ms
    status, answer = _gate_call(gate, b"image")
    assert status == 503 and touched == []
    assert "about 90 ms behind 8 others" in answer["detail"]
    assert "serve.slo_ms=100" in answer["detail"]
    text = gate.metrics.exposition().decode()
    assert 'flexens_shed_requests_total{reason="slo"} 1.0' in text
    gate.in_flight = 6  # about 70 ms: taken
    status, _ = _gate_call(gate, b"image")
    assert status == 200 and touched == ["submit"]
    sent = []

    async def send(message):
        sent.append(message)

    scrape = {"type": "http", "path": "/metrics", "method": "GET", "headers": []}
    asyncio.run(gate(scrape, None, send))
    assert "flexens_slo_service_time_seconds 0.01" in sent[1]["body"].decode()
    assert "flexens_event_loop_lag_seconds" in sent[1]["body"].decode()


class _Front:
    """A serving front that offers only its default point (what the gate asks of one)."""

    def __init__(self, point):
        self.default = point

    def resolve(self, asked):
        assert not asked
        return None


def _gate_call(gate, body: bytes, headers=(), method="POST", path="/predict"):
    """One request through ``gate`` in-process: its status and JSON answer."""
    import asyncio

    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": path, "method": method, "headers": list(headers)}
    asyncio.run(gate(scope, receive, send))
    return sent[0]["status"], json.loads(sent[1]["body"])


def _gate(submit, api_key=None):
    from flexens.serving.gate import RequestGate
    from flexens.serving.points import ServedPoint

    point = ServedPoint("calibrated", (0.5,), 1.0, False, None, None)

    async def app(scope, receive, send):
        raise AssertionError("the gate answers POST /predict itself")

    return RequestGate(
        app, submit=submit, front=_Front(point), decode=lambda data: torch.full((1, 2, 2), 0.25),
        max_body_bytes=100, num_members=2, ladder=[point], api_key=api_key,
    )  # fmt: skip


def test_the_gate_hands_decoded_pixels_to_the_workers_and_answers_itself():
    """No second parse: the workers get the float32 pixels as bytes, with the thresholds and
    name of the point, and their answer goes back as the JSON body."""
    payloads = []

    async def submit(payload):
        payloads.append(payload)
        return {"class_index": 1, "members_used": 2, "operating_point": payload["point"]}

    gate = _gate(submit)
    status, answer = _gate_call(gate, b"image bytes")
    assert status == 200 and answer["members_used"] == 2
    sent = payloads[0]
    assert sent["shape"] == (1, 2, 2) and sent["thresholds"] == (0.5,)
    assert sent["point"] == "calibrated" == answer["operating_point"]
    assert sent["in_flight"] == 1  # itself: the worker waits for no one else
    pixels = torch.frombuffer(bytearray(sent["x"]), dtype=torch.float32)
    assert torch.equal(pixels, torch.full((4,), 0.25))
    assert "flexens_members_used_sum 2.0" in gate.metrics.exposition().decode()


class _Queue:
    """A request queue whose ``get`` with a timeout (the worker waiting) is recorded and
    hands over the requests still on their way, one per call, then reports it empty."""

    def __init__(self, queued: list, on_the_way: list) -> None:
        self.queued, self.on_the_way, self.waits = list(queued), list(on_the_way), 0

    def get(self, timeout: float):
        from queue import Empty

        if self.queued:  # the loop's first, blocking get
            return self.queued.pop(0)
        self.waits += 1
        if not self.on_the_way:
            raise Empty
        return self.on_the_way.pop(0)

    def get_nowait(self):
        from queue import Empty

        if not self.queued:
            raise Empty
        return self.queued.pop(0)


@pytest.mark.parametrize(
    ("counts", "on_the_way", "batch", "waits"),
    [
        ([1], 2, 1, 0),  # a lone request never waits, even with others arriving later
        ([3, 3], 2, 3, 1),  # one more was admitted: wait for it, and no longer
        ([2, 4], 0, 2, 1),  # admitted ones that never come: one wait, up to the timeout
        ([None], 2, 3, 3),  # no count (another front door): wait until the queue is empty
    ],
)
def test_the_worker_waits_only_for_requests_the_gate_admitted(counts, on_the_way, batch, waits):
    """DrainingLoop: after what is queued, it waits (at most ``batch_timeout``) only while
    its batch holds fewer requests than the gate counted in the server."""
    from types import SimpleNamespace

    from flexens.serving.api import DrainingLoop

    def request(i: int, count: int | None):
        payload = {"x": b"", "shape": (1,), "thresholds": None, "point": "p"}
        return (0, f"uid{i}", time.monotonic(), payload | {"in_flight": count})

    queue = _Queue(
        [request(i, c) for i, c in enumerate(counts)],
        [request(10 + i, 3) for i in range(on_the_way)],
    )
    api = SimpleNamespace(max_batch_size=8, batch_timeout=30.0, request_timeout=30.0)
    payloads, timed_out = DrainingLoop().get_batch_requests(api, queue, None)
    assert len(payloads) == batch and timed_out == [] and queue.waits == waits


def test_the_worker_answers_each_batch_as_litserves_own_loop_does():
    """DrainingLoop calls the API's methods directly; LitServe's loop (which runs when a
    callback is registered) gives every request the same answer: a 504 for one that waited
    too long, the API's answers, an ``HTTPException``'s status or a 500 for a whole batch."""
    import queue
    from types import SimpleNamespace

    import litserve as ls
    from fastapi import HTTPException
    from litserve.callbacks.base import Callback, CallbackRunner
    from litserve.loops.base import _SENTINEL_VALUE
    from litserve.utils import LitAPIStatus

    from flexens.serving.api import DrainingLoop
    from flexens.serving.transport import WorkerFailed

    class Api(ls.LitAPI):
        def setup(self, device):
            pass

        def batch(self, xs):
            return list(xs)

        def unbatch(self, ys):
            return ys

        def predict(self, xs):
            if "http" in xs:
                raise HTTPException(422, detail="unprocessable")
            if "boom" in xs:
                raise ValueError("boom")
            return [x.upper() for x in xs]

        def encode_response(self, y):
            return {"answer": y}

    def answers(callbacks: list) -> list:
        api = Api(max_batch_size=3, batch_timeout=0.0)
        api.request_timeout = 30.0
        requests = queue.Queue()
        kinds = ["ok", "ok", "ok", "http", "ok", "ok", "boom", "ok", "ok"]
        for i, kind in enumerate(kinds):
            born = time.monotonic() - (60 if i == 0 else 0)  # the first waited too long
            requests.put((0, f"u{i}", born, kind))
        requests.put(_SENTINEL_VALUE)
        sent = []
        transport = SimpleNamespace(send=lambda item, consumer_id: sent.append(item))
        loop = DrainingLoop()
        loop.run_batched_loop(api, requests, transport, CallbackRunner(callbacks))
        out = []
        for uid, (data, status, _, _) in sent:
            if status == LitAPIStatus.ERROR:
                data = WorkerFailed.from_response(data).status
            out.append((uid, status, data))
        return sorted(out)

    ours = answers([])
    assert ours == answers([Callback()])
    assert [answer for _, _, answer in ours] == [
        504,
        {"answer": "OK"},
        {"answer": "OK"},
        422,
        422,
        422,
        500,
        500,
        500,
    ]


def test_a_worker_error_reaches_the_client_with_its_status_and_one_line():
    from flexens.serving.transport import WorkerFailed

    async def submit(payload):
        raise WorkerFailed(504, "Request timed out")

    status, answer = _gate_call(_gate(submit), b"image bytes")
    assert (status, answer) == (504, {"detail": "Request timed out"})


def test_with_an_api_key_the_gate_refuses_a_missing_or_wrong_key_before_the_body():
    submitted = []

    async def submit(payload):
        submitted.append(payload)
        return {"members_used": 1}

    gate = _gate(submit, api_key="s3cret")
    for headers in ([], [(b"x-api-key", b"wrong")]):
        status, answer = _gate_call(gate, b"image bytes", headers)
        assert status == 401 and "X-API-Key" in answer["detail"]
    assert submitted == []
    status, _ = _gate_call(gate, b"image bytes", [(b"x-api-key", b"s3cret")])
    assert status == 200 and len(submitted) == 1
    metrics = _gate_call(gate, b"", method="GET", path="/metrics")
    assert metrics[0] == 401


def test_submit_queues_the_request_and_returns_the_workers_answer():
    """FastQueueLitServer.submit does what LitServe's route does after parsing: the request
    goes on the API's queue with a fresh uid, LitServe's response reader fills the buffer,
    and an error answer becomes a WorkerFailed with the worker's status (500 otherwise)."""
    import asyncio
    import pickle

    import litserve as ls
    from fastapi import HTTPException
    from litserve.utils import LitAPIStatus, PickleableHTTPException

    from flexens.serving.transport import FastQueueLitServer, WorkerFailed

    class Echo(ls.LitAPI):
        def setup(self, device):
            pass

        def predict(self, x):
            return x

    server = FastQueueLitServer(Echo())
    server.app.response_queue_id = 0
    answers = []  # what the workers send back for the next request: (response, status)

    class Queue:  # the workers, answering through the response buffer as LitServe's reader
        def put(self, item):
            queue_id, uid, _, payload = item
            assert queue_id == 0 and payload == {"x": b"pixels"}
            buffered = server.response_buffer[uid]
            buffered.response = list(answers.pop(0))
            asyncio.get_running_loop().call_soon(buffered.event.set)

    server._get_request_queue = lambda path: Queue()
    answers.append(({"ok": True}, LitAPIStatus.OK))
    assert asyncio.run(server.submit({"x": b"pixels"})) == {"ok": True}
    timed_out = PickleableHTTPException.from_exception(HTTPException(504, "Request timed out"))
    for response, status in ((timed_out, 504), (pickle.dumps(ValueError("boom")), 500)):
        answers.append((response, LitAPIStatus.ERROR))
        with pytest.raises(WorkerFailed) as failed:
            asyncio.run(server.submit({"x": b"pixels"}))
        assert failed.value.status == status
    assert server.response_buffer == {}


def test_max_in_flight_is_checked_with_the_other_settings():
    from omegaconf import OmegaConf

    from flexens.serving.settings import read_settings

    raw = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/serve/default.yaml"))
    assert read_settings(raw, Path("m"), "cpu").max_in_flight == 256
    raw["max_in_flight"] = None
    assert read_settings(raw, Path("m"), "cpu").max_in_flight is None
    raw["max_in_flight"] = 0
    with pytest.raises(
        ValueError, match=r"^serve.max_in_flight must be a whole number >= 1, got 0$"
    ):
        read_settings(raw, Path("m"), "cpu")


def test_cuda_graphs_is_a_flag_and_the_gate_says_what_shape_to_capture():
    from omegaconf import OmegaConf

    from flexens.data.digits import DigitsDataModule
    from flexens.data.kernels import fast_transform
    from flexens.images import decode_image
    from flexens.serving.app import served_input_shape
    from flexens.serving.settings import read_settings

    raw = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/serve/default.yaml"))
    assert read_settings(raw, Path("m"), "cpu").cuda_graphs is True
    with pytest.raises(ValueError, match=r"^serve.cuda_graphs must be true or false, got 'no'$"):
        read_settings({**raw, "cuda_graphs": "no"}, Path("m"), "cpu")
    # whatever the blank's size, the gate's decoding ends at the members' input size
    decode = functools.partial(
        decode_image, in_chans=1, transform=fast_transform(DigitsDataModule().image_transform()),
        max_pixels=1 << 20,
    )  # fmt: skip
    assert served_input_shape(decode) == (1, 8, 8)


def test_slo_settings_of_the_wrong_type_are_refused_with_one_line():
    from omegaconf import OmegaConf

    from flexens.serving.settings import read_settings

    raw = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/serve/default.yaml"))
    raw["slo_ms"] = 50
    assert read_settings(raw, Path("m"), "cpu").slo["shed_at"] == 0.8
    for key, value, says in (
        ("shed_at", "yes", r"^serve.slo.shed_at must be a finite number, got 'yes'$"),
        ("shed_at", 2, r"^serve.slo.shed_at must be in \(0, 1\] or null, got 2.0$"),
        ("step_up_at", None, r"^serve.slo.step_up_at must be a finite number, got None$"),
        ("min_samples", 2.5, r"^serve.slo.min_samples must be a whole number >= 1, got 2.5$"),
        ("typo", 1, r"^unknown serve.slo setting\(s\) \['typo'\]$"),
    ):
        bad = {**raw, "slo": {**raw["slo"], key: value}}
        with pytest.raises(ValueError, match=says):
            read_settings(bad, Path("m"), "cpu")
    never = {**raw, "slo": {**raw["slo"], "shed_at": None}}
    assert read_settings(never, Path("m"), "cpu").slo["shed_at"] is None


def test_slo_controller_steps_faster_under_load_and_back_when_it_drops():
    controller = SloController(POLICY)
    trace = (
        steady(0, 5, 50, 20)  # quiet: well under the SLO
        + steady(5, 3, 200, 95)  # a burst: p99 past 0.8 × SLO
        + steady(8, 3, 200, 90)  # still hot at level 1
        + steady(11, 10, 50, 10)  # load gone
    )
    switches = replay(controller, trace)
    assert [(s.from_level, s.to_level) for s in switches] == [(0, 1), (1, 2), (2, 1), (1, 0)]
    up = switches[0]
    assert 5 < up.at_s < 6 and up.p99_ms > 80 and up.rate_rps > 45 and up.in_flight == 4
    line = up.describe(["calibrated", "max_drop=0.05", "max_drop=0.1"], 100)
    assert "calibrated -> max_drop=0.05 (faster)" in line and "req/s" in line
    assert all(
        b.at_s - a.at_s >= POLICY.hold_s for a, b in zip(switches, switches[1:], strict=False)
    )
    assert controller.level == 0


def test_slo_controller_does_not_flap_inside_the_hysteresis_band():
    controller = SloController(POLICY)
    switches = replay(controller, steady(0, 0.1, 100, 90))  # one step up...
    assert [(s.from_level, s.to_level) for s in switches] == [(0, 1)]
    # ...then p99 around 45 ms at level 1: scaled to level 0's cost (×2) it would be 90 ms,
    # above step_down_at × SLO = 50 ms, and below step_up_at × SLO = 80 ms: stay.
    assert replay(controller, steady(2, 30, 100, 40, jitter=2.0)) == []
    assert controller.level == 1


def test_slo_controller_waits_for_enough_samples_and_is_deterministic():
    few = SloController(POLICY)
    assert replay(few, [(0.1 * i, 500.0) for i in range(9)]) == []  # 9 < min_samples
    trace = steady(0, 20, 80, 60, jitter=30.0)
    first = [s for s in replay(SloController(POLICY), trace)]
    second = [s for s in replay(SloController(POLICY), trace)]
    assert first == second


def test_slo_controller_judges_its_window_a_bounded_number_of_times(monkeypatch):
    """At 1,000 answers/s the window's p99 is computed about 20 times per window, not once
    per request (under overload the HTTP process cannot afford a sort per answer)."""
    from flexens.serving import slo

    judged = []
    quantile = np.quantile
    monkeypatch.setattr(slo.np, "quantile", lambda *a, **k: judged.append(1) or quantile(*a, **k))
    replay(SloController(POLICY), steady(0, 4, 1000, 20))
    assert 4 * slo.CHECKS_PER_WINDOW / POLICY.window_s <= len(judged) <= 41


def test_slo_controller_sheds_only_at_its_fastest_point_and_only_behind_others():
    policy = SloPolicy(slo_ms=100.0, costs=(12.0, 6.0, 3.0), min_samples=10, hold_s=2.0)
    controller = SloController(policy)
    assert controller.admits(1000)  # nothing measured yet
    for t, lat in steady(0, 1, 50, 60.0):  # 60 ms behind 3 requests: 20 ms per request
        controller.observe(t, lat, in_flight=3, ahead=3)
    assert controller.service_ms == pytest.approx(20.0)
    assert controller.predicted_wait_ms(5) == pytest.approx(120.0)
    assert controller.admits(5)  # level 0 steps faster before it sheds anything
    controller.level = 2
    assert controller.admits(3) and not controller.admits(4)  # 80 ms is the edge: 0.8 × SLO
    assert not controller.admits(3, lag_ms=10.0)  # the HTTP process's own backlog counts too
    assert controller.predicted_wait_ms(3, lag_ms=10.0) == pytest.approx(90.0)
    assert controller.admits(0)  # an empty server always takes a request, to keep measuring
    never = SloController(SloPolicy(slo_ms=100.0, costs=(2.0, 1.0), min_samples=10, shed_at=None))
    never.level = 1
    for t, lat in steady(0, 1, 50, 500.0):
        never.observe(t, lat, in_flight=3, ahead=1)
    assert never.service_ms == pytest.approx(500.0) and never.admits(100)


def test_the_event_loops_lag_shows_a_blocked_http_process():
    """A request that arrives while the HTTP process is busy waits before the gate sees it;
    the loop's lag is that wait (here the loop is blocked for 200 ms)."""
    import asyncio
    import time

    from flexens.serving.gate import LoopLag

    lag = LoopLag(interval_s=0.05)

    async def scenario() -> float:
        lag.start()
        await asyncio.sleep(0.01)
        time.sleep(0.2)  # the process busy with other work: the timer fires late
        await asyncio.sleep(0.001)
        return lag.ms

    assert asyncio.run(scenario()) >= 100.0


def test_after_a_switch_slo_mode_forgets_the_old_points_service_time():
    controller = SloController(POLICY)
    for t, lat in steady(0, 1, 100, 95.0):
        if controller.observe(t, lat, 4, ahead=2) is not None:
            break
    assert controller.level == 1
    assert controller.service_ms is None and controller.admits(100)
    for t, lat in steady(1.5, 1, 100, 30.0):  # during the hold: measured, no switch
        assert controller.observe(t, lat, 4, ahead=2) is None
    assert controller.service_ms == pytest.approx(15.0)


def test_slo_policy_refuses_a_ladder_that_does_not_get_faster():
    with pytest.raises(ValueError, match="cheaper than the one before"):
        SloPolicy(slo_ms=50, costs=(5.0, 5.0))
    with pytest.raises(ValueError, match="step_down_at < serve.slo.step_up_at"):
        SloPolicy(slo_ms=50, costs=(5.0, 2.0), step_up_at=0.5, step_down_at=0.6)
    with pytest.raises(ValueError, match="shed_at must be in"):
        SloPolicy(slo_ms=50, costs=(5.0, 2.0), shed_at=1.5)


# -- the real server --------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def digit_images(folder: Path, count: int = 24) -> list[Path]:
    """Test digits as image files a user would send: dark ink on white, some enlarged RGB."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = (255 - digits.images[-1 - i] * 16).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(pixels, "L")
        if i % 3 == 0:
            image = image.resize((32, 32)).convert("RGB")
        path = folder / f"digit{i:02d}.png"
        image.save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def served(digits_ensemble, tmp_path_factory):
    """A calibrated digits ensemble served by serve.py on a free loopback port."""
    out = digits_ensemble
    if not (out / MEMBERS / "thresholds.json").is_file():
        run_script("calibrate.py", f"paths.output_dir={out}", "logger=csv")
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    process = start_server(out, port, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log)
        yield url, out
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def start_server(out: Path, port: int, log: Path, own_group: bool = False) -> subprocess.Popen:
    """serve.py on ``port``; with ``own_group`` in a process group of its own, as a terminal
    would start it (a Ctrl-C there reaches the group)."""
    env = {**os.environ, "FLEXENS_ROOT": str(ROOT), "OMP_NUM_THREADS": "1"}
    with log.open("w") as sink:
        return subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "serve.py"),
                f"paths.output_dir={out}",
                f"serve.port={port}",
                "serve.threads=1",
                "serve.batch_timeout=0.02",
                "serve.max_body_bytes=200000",
                "serve.max_pixels=1000000",
            ],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=own_group,
        )


def wait_healthy(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve.py exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"serve.py not healthy after {STARTUP_S} s:\n{log.read_text()}")


def infer_predictions(out: Path, folder: Path, *overrides: str) -> dict[str, dict]:
    run_script("infer.py", f"paths.output_dir={out}", "logger=csv", f"input={folder}", *overrides)
    newest = sorted(out.glob("runs/infer/*"))[-1]
    rows = csv.DictReader((newest / "predictions.csv").open())
    return {Path(r["file"]).name: r for r in rows}


def post(url: str, path: Path, **params) -> httpx.Response:
    return httpx.post(f"{url}/predict", content=path.read_bytes(), params=params, timeout=30)


def test_served_answers_equal_infer_py_on_the_same_images(served, tmp_path):
    url, out = served
    paths = digit_images(tmp_path / "images")
    expected = infer_predictions(out, tmp_path / "images")
    with ThreadPoolExecutor(8) as pool:  # concurrent: they arrive as dynamic batches
        answers = list(pool.map(lambda p: post(url, p), paths))
    for path, answer in zip(paths, answers, strict=True):
        assert answer.status_code == 200, answer.text
        got, want = answer.json(), expected[path.name]
        assert got["class_name"] == want["class_name"], path.name
        assert got["members_used"] == int(want["members_used"]), path.name
        assert got["confidence"] == pytest.approx(float(want["confidence"]), abs=2.1e-6)
        assert got["operating_point"] == "calibrated"
    # JSON with base64 gives the same answer as raw bytes
    body = {"image": base64.b64encode(paths[0].read_bytes()).decode()}
    assert httpx.post(f"{url}/predict", json=body).json() == answers[0].json()
    assert httpx.get(f"{url}/health").text == "ok"


POINTS = [{}, {"max_drop": 0.2}, {"budget_ms": 100}, {"max_drop": 0.001}]


def same_answer(a: dict, b: dict) -> bool:
    """Equal answers; confidences to float rounding (batches of other sizes round differently)."""
    return {**a, "confidence": None} == {**b, "confidence": None} and abs(
        a["confidence"] - b["confidence"]
    ) <= 2e-6


def test_each_request_is_served_at_its_own_operating_point(served, tmp_path):
    """Every image at every point, all at once (batches mix points), then one by one."""
    url, _ = served
    paths = digit_images(tmp_path / "images", count=12)
    asks = [(path, point) for path in paths for point in POINTS]
    with ThreadPoolExecutor(12) as pool:
        mixed = list(pool.map(lambda a: post(url, a[0], **a[1]).json(), asks))
    alone = [post(url, path, **point).json() for path, point in asks]  # batches of one
    for (path, point), m, a in zip(asks, mixed, alone, strict=True):
        assert same_answer(m, a), (path.name, point, m, a)
    served_at = [m["operating_point"] for m in mixed]
    assert served_at[:4] == ["calibrated", "max_drop=0.2", "budget_ms=100", "max_drop=0.001"]
    used = np.array([m["members_used"] for m in mixed]).reshape(len(paths), len(POINTS))
    # a looser certified point halts every image no later, and some earlier
    assert (used[:, 1] <= used[:, 3]).all() and used[:, 1].sum() < used[:, 3].sum()


@pytest.mark.slow
def test_a_requested_point_equals_infer_py_at_that_operating_point(served, tmp_path):
    url, out = served
    paths = digit_images(tmp_path / "images")
    expected = infer_predictions(out, tmp_path / "images", "infer.operating_point.max_drop=0.2")
    for path in paths:
        got, want = post(url, path, max_drop=0.2).json(), expected[path.name]
        assert got["members_used"] == int(want["members_used"]), path.name
        assert got["class_name"] == want["class_name"], path.name
        assert got["confidence"] == pytest.approx(float(want["confidence"]), abs=2.1e-6)


def png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header declares ``width × height`` pixels: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 100_000)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def test_every_bad_request_gets_its_4xx_and_the_server_keeps_answering(served, tmp_path):
    url, _ = served
    good = digit_images(tmp_path / "images", count=1)[0]
    noise = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    whole = buffer.getvalue()
    bomb = png_declaring(20_000, 20_000)  # would decode to 400 MB
    bad = {
        "empty body": (b"", {}, 400, "empty body"),
        "not an image": (b"hello, world", {}, 400, "not an image: no image format"),
        "truncated image": (whole[: len(whole) // 2], {}, 400, "not a readable image"),
        "decompression bomb": (bomb, {}, 413, "too large"),
        "over the pixel limit": (png_declaring(2000, 2000), {}, 413, "over the limit of 1,000,000"),
        "oversized body": (b"\0" * 300_000, {}, 413, "larger than the server's limit"),
        "unknown operating point": (good.read_bytes(), {"speed": "fast"}, 400, "unknown query"),
        "point outside the limits": (good.read_bytes(), {"max_drop": 0.9}, 422, "outside"),
        "point not a number": (good.read_bytes(), {"max_drop": "lots"}, 422, "must be a number"),
    }
    assert len(bomb) < 200_000  # the body limit does not catch it: the pixel limit must
    for name, (body, params, status, reason) in bad.items():
        answer = httpx.post(f"{url}/predict", content=body, params=params, timeout=30)
        assert answer.status_code == status, (name, answer.text)
        detail = answer.json()["detail"]
        assert reason in detail and "\n" not in detail, (name, detail)
        assert post(url, good).status_code == 200, name
    bad_json = httpx.post(
        f"{url}/predict", content=b"{", headers={"content-type": "application/json"}
    )
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["detail"]
    metrics = httpx.get(f"{url}/metrics").text
    assert 'flexens_rejected_requests_total{status="413"} 3.0' in metrics
    assert "flexens_request_latency_seconds_bucket" in metrics
    assert "flexens_operating_point{expected_ms=" in metrics
    assert "flexens_members_used_bucket" in metrics


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_killing_serve_py_outright_stops_its_workers_and_frees_the_port(
    served, tmp_path, monkeypatch
):
    """kill -9 of the main process gives LitServe no chance to stop its HTTP process and
    workers: each stops itself when its parent dies, and the port can be bound again."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from serve_load import descendants

    _, out = served
    port = free_port()
    process = start_server(out, port, tmp_path / "server.log")
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process, tmp_path / "server.log")
        children = descendants(process.pid)
        assert len(children) >= 2  # the HTTP process and an inference worker at least
    finally:
        process.kill()
        process.wait(timeout=10)
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in children if alive(pid)]
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))


@pytest.mark.parametrize("how", ["SIGTERM to serve.py", "Ctrl-C to its process group"])
def test_serve_py_stops_cleanly_on_sigterm_and_ctrl_c(served, tmp_path, monkeypatch, how):
    """A normal stop ends every process of the server, with no traceback in its output."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from serve_load import descendants

    _, out = served
    port, log = free_port(), tmp_path / "server.log"
    process = start_server(out, port, log, own_group=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process, log)
        children = descendants(process.pid)
        if how.startswith("SIGTERM"):
            process.terminate()
        else:
            os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in children if alive(pid)]
    assert "Traceback" not in log.read_text()


@pytest.mark.slow
def test_serve_py_refuses_bad_settings_with_one_line(digits_ensemble):
    result = run_script(
        "serve.py", f"paths.output_dir={digits_ensemble}", "serve.host=example.com", check=False
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: serve.host must be one of")
    missing = run_script("serve.py", "serve.thresholds=/nonexistent/thresholds.json", check=False)
    assert missing.returncode == 2 and "serve.thresholds=" in missing.stderr


def test_server_json_shape(served, tmp_path):
    url, _ = served
    answer = post(url, digit_images(tmp_path / "images", count=1)[0]).json()
    assert set(answer) == {
        "class_name",
        "class_index",
        "confidence",
        "members_used",
        "operating_point",
    }
    assert json.loads(httpx.get(f"{url}/info").text)["model"]["ensemble"] == "digits-small_cnn"
