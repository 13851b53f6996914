"""The inference worker: a LitServe ``LitAPI`` that runs each dynamic batch through halting.

A batch may mix requests served at different operating points. It runs once, through
``FlexibleEnsembleModule`` with a ``(B, N-1)`` tensor of per-sample thresholds: each sample
halts at the first stage where *its own* thresholds say stop, exactly as it would alone
(:func:`flexens.ensemble.run_flexible` compares each row as it compares a shared set).
Grouping by operating point would run one sub-batch per point, so a batch of B requests
at B points would lose batching altogether; running the batch to the strictest point and
answering each at its own stage would run every member the strictest request needs on
every sample. Per-sample thresholds cost one gather per stage and neither.
"""

from __future__ import annotations

import logging
import pickle
import time
from pathlib import Path
from queue import Empty, Queue

import litserve as ls
import torch
from fastapi import HTTPException
from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.loops.simple_loops import BatchedLoop
from litserve.utils import LitAPIStatus, LoopResponseType, PickleableHTTPException

from flexens.allocator import retain_freed_memory
from flexens.ensemble import FlexibleEnsembleModule
from flexens.serving.transport import die_with_parent, exit_quietly_on_interrupt

POLL_S = 0.05
"""How long the worker blocks on an empty queue before looking again (no busy waiting)."""

logger = logging.getLogger(__name__)


class DrainingLoop(BatchedLoop):
    """Dynamic batching that never makes a lone request wait.

    LitServe's batched loop holds every batch open for ``batch_timeout``, even a batch of
    one on an idle server, so that delay is paid by every request; with ``batch_timeout=0``
    it polls an empty queue in a busy loop instead, taking a core. This loop blocks for the
    first request, then takes whatever else is already queued (up to ``max_batch_size``).
    It waits at most ``batch_timeout`` more, and only for requests the gate has admitted
    that are not in the batch yet: each payload carries the gate's count of requests in
    the server when it was submitted (``in_flight``), and while the batch holds fewer, the
    missing ones are being read or decoded a moment behind. A lone request (count 1) never
    waits. Under load the batch fills with them rather than leaving them to the next
    round: the members' cost per image falls steeply from one sample to a few
    (BENCHMARKS.md, serving).

    Each batch runs through the API's methods called directly: LitServe's loop looks up the
    signature of five of them per batch (``inspect.signature``) to pass a ``context`` that
    :class:`EnsembleAPI` does not take, which at batch 1 is a visible part of the worker's
    own time. With callbacks registered, LitServe's own loop runs, so that they are called.
    """

    def run_batched_loop(self, lit_api, request_queue, transport, callback_runner, lit_spec=None):
        if callback_runner._callbacks or lit_api.spec is not None:
            return super().run_batched_loop(lit_api, request_queue, transport, callback_runner)
        while True:
            try:
                payloads, timed_out = self.get_batch_requests(lit_api, request_queue, transport)
            except _StopLoopError:
                return
            if timed_out:
                expired = PickleableHTTPException(504, "Request timed out")
                for response_queue_id, uid in timed_out:
                    self._reply(transport, response_queue_id, uid, expired, LitAPIStatus.ERROR)
            if payloads:
                self._run(lit_api, transport, payloads)

    def _run(self, lit_api: ls.LitAPI, transport, payloads: list) -> None:
        """One batch, answered as LitServe's loop answers it: an ``HTTPException`` answers
        every request of the batch with its status, any other error (pickled, as LitServe's
        ``put_error_response`` sends it) with a 500."""
        response_queue_ids, uids, inputs = zip(*payloads, strict=True)
        try:
            batch = lit_api.batch([lit_api.decode_request(x) for x in inputs])
            outputs = lit_api.unbatch(lit_api.predict(batch))
            if len(outputs) != len(inputs):
                raise HTTPException(500, detail="Batch size mismatch")
            answers, status = [lit_api.encode_response(y) for y in outputs], LitAPIStatus.OK
        except HTTPException as error:
            failure = PickleableHTTPException.from_exception(error)
            answers, status = [failure] * len(inputs), LitAPIStatus.ERROR
        except Exception as error:
            logger.exception("the ensemble failed on a batch of %d request(s)", len(inputs))
            answers, status = [pickle.dumps(error)] * len(inputs), LitAPIStatus.ERROR
        for response_queue_id, uid, answer in zip(response_queue_ids, uids, answers, strict=True):
            self._reply(transport, response_queue_id, uid, answer, status)

    def _reply(self, transport, response_queue_id: int, uid: str, data, status) -> None:
        self.put_response(transport, response_queue_id, uid, data, status, LoopResponseType.REGULAR)

    def get_batch_requests(self, lit_api: ls.LitAPI, request_queue: Queue, transport):
        try:
            items = [request_queue.get(timeout=POLL_S)]
        except Empty:
            return [], []
        deadline = time.monotonic() + lit_api.batch_timeout
        while len(items) < lit_api.max_batch_size:
            try:
                items.append(request_queue.get_nowait())
                continue
            except Empty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0 or len(items) >= admitted(items):
                break
            try:
                items.append(request_queue.get(timeout=remaining))
            except Empty:
                break
        return self._sort(lit_api, items)

    @staticmethod
    def _sort(lit_api: ls.LitAPI, items: list) -> tuple[list, list]:
        """Payloads to run, and requests that waited past LitServer's ``timeout`` (504)."""
        payloads, timed_out = [], []
        expires = lit_api.request_timeout not in (-1, False, None)
        for item in items:
            if item == _SENTINEL_VALUE:
                raise _StopLoopError()
            response_queue_id, uid, timestamp, payload = item
            if expires and time.monotonic() - timestamp > lit_api.request_timeout:
                timed_out.append((response_queue_id, uid))
            else:
                payloads.append((response_queue_id, uid, payload))
        return payloads, timed_out


def admitted(items: list) -> float:
    """The most requests the gate counted in the server when it submitted one of ``items``
    (a request without that count, or the stop sentinel: no limit, wait the full timeout)."""
    counts = []
    for *_, payload in items:
        count = payload.get("in_flight") if isinstance(payload, dict) else None
        counts.append(float("inf") if count is None else count)
    return max(counts)


class EnsembleAPI(ls.LitAPI):
    """Holds only paths and settings until :meth:`setup` (it is pickled into the worker)."""

    def __init__(
        self,
        thresholds: Path,
        members_dir: Path,
        mode: str,
        threads: int | None,
        max_batch_size: int,
        batch_timeout: float,
        cuda_graphs: bool = False,
        input_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__(
            max_batch_size=max_batch_size, batch_timeout=batch_timeout, loop=DrainingLoop()
        )
        self.thresholds_path, self.members_dir = thresholds, members_dir
        self.mode, self.threads = mode, threads
        self.cuda_graphs, self.input_shape = cuda_graphs, input_shape

    def setup(self, device) -> None:
        from flexens.inference import load_calibrated_members

        die_with_parent()  # a worker must not wait on its queue after serve.py was killed
        exit_quietly_on_interrupt()
        retain_freed_memory()  # a spawned process: serve.py's own setting does not reach it
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        members, calibration = load_calibrated_members(
            self.thresholds_path, self.members_dir, "serve.thresholds"
        )
        self.device = torch.device(device)
        self.module = (
            FlexibleEnsembleModule(
                [m.network for m in members],
                calibration.thresholds,
                calibration.criterion,
                mode=self.mode,
                cuda_graphs=self.cuda_graphs,
            )
            .to(self.device)
            .eval()
        )
        if self.cuda_graphs and self.device.type == "cuda" and self.input_shape is not None:
            # every graph a batch can need, now: a capture costs milliseconds no request should pay
            example = torch.zeros(1, *self.input_shape, device=self.device)
            self.module.prepare_graphs(example, self.max_batch_size)
        self.class_names = list(members[0].meta["class_names"])

    def decode_request(self, request: dict) -> tuple[torch.Tensor, tuple | None, str]:
        """The gate's payload: a decoded image, its thresholds, the name of its point."""
        x = torch.frombuffer(bytearray(request["x"]), dtype=torch.float32)
        return x.reshape(request["shape"]), request["thresholds"], request["point"]

    def batch(self, inputs: list) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
        xs, thresholds, points = zip(*inputs, strict=True)
        limits = None if self.mode == "full" else torch.tensor(thresholds, dtype=torch.float64)
        return torch.stack(xs), limits, list(points)

    def predict(self, batch) -> list[dict]:
        x, limits, points = batch
        with torch.inference_mode():
            out = self.module(x.to(self.device), thresholds=limits)
            confidence = out.probs.amax(dim=1).cpu().tolist()
            prediction = out.prediction.cpu().tolist()
            exits = out.exit_stage.cpu().tolist()
        return [
            {
                "class_name": self.class_names[p],
                "class_index": p,
                "confidence": round(c, 6),
                "members_used": e + 1,
                "operating_point": point,
            }
            for p, c, e, point in zip(prediction, confidence, exits, points, strict=True)
        ]

    def unbatch(self, output: list[dict]) -> list[dict]:
        return output

    def encode_response(self, output: dict) -> dict:
        return output
