"""``LitServer`` without four per-request costs of LitServe 0.2.19's plumbing, and whose
processes do not outlive it.

1. ``fast_queue=True`` is silently dropped (LitServe issue #751, open PR #752): the
   transport type goes to ``TransportConfig`` under a wrong keyword, so every response
   travels through a multiprocessing Manager queue (a round trip through a third process)
   and the HTTP process waits for each one in a thread. Its ZeroMQ wiring also swaps the
   broker's two addresses, so setting the type alone would leave every request hanging.
   With ``fast_queue``, :class:`FastQueueLitServer` sends responses over plain pipes
   instead (:class:`PipeTransport`), which cost less than even a working ZeroMQ broker.
2. With it, requests go to the workers through a plain ``multiprocessing.Queue`` instead of
   a Manager queue: a pipe, without the Manager's round trip per request.
3. Without an API key, LitServe guards its routes with a synchronous no-op dependency,
   which FastAPI runs in a thread pool: one thread hop per request for nothing. An async
   no-op takes its place (``LIT_SERVER_API_KEY`` and a ``LitAPI.authorize`` still apply).
4. A front door (``serve.py``'s gate) hands each checked, decoded request straight to the
   workers' queue with :meth:`FastQueueLitServer.submit` and awaits its answer in LitServe's
   response buffer, as LitServe's own route does, without the FastAPI round it takes
   (routing, dependencies, a JSON body parsed again, the response serialised again). The
   route it replaces is never reached, so the door checks ``LIT_SERVER_API_KEY`` itself.

On a one-core server the transport alone gives flexible serving 15–27 % more throughput
(``benchmarks/serve_ab.py serve.fast_queue=false serve.fast_queue=true``; BENCHMARKS.md).
Drop each fix once LitServe has it.

LitServe ends its HTTP and worker processes when the main process stops normally, but
nothing watches for a main process that is killed (``kill -9``, the OOM killer): its
workers then wait on their queue forever and its HTTP process keeps the port. Each of them
asks Linux to stop it when its parent dies (:func:`die_with_parent`). A normal stop
(SIGTERM, or Ctrl-C to the whole process group) ends every process without a traceback
(:func:`stop_on_signals`, :func:`exit_quietly_on_interrupt`).
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import multiprocessing as mp
import os
import pickle
import select
import signal
import struct
import sys
import time
import uuid
from contextlib import asynccontextmanager
from multiprocessing.managers import SyncManager
from queue import Empty

import litserve as ls
from litserve import server as litserve_server
from litserve.transport.base import MessageTransport
from litserve.transport.factory import create_transport_from_config
from litserve.utils import LitAPIStatus, PickleableHTTPException, ResponseBufferItem


class PipeTransport(MessageTransport):
    """Responses from the workers to the HTTP processes over one OS pipe per HTTP process.

    Each response is one length-prefixed pickle written by one ``write`` of at most
    ``PIPE_BUF`` bytes, which POSIX makes atomic: any number of workers write to the same
    pipe without a lock, and no reader ever sees half of one, even from a worker killed
    while writing. The HTTP process's event loop reads the pipe when it is readable. So a
    response wakes one process, the one awaiting it. Through ZeroMQ it crossed a broker
    thread in a third process and the I/O threads of three ZeroMQ contexts, and on a
    one-core server each of those hops is a context switch (BENCHMARKS.md, serving: the
    batch-1 overhead and LitServe's floor under it).
    """

    def __init__(self, readers: list, writers: list) -> None:
        self.readers, self.writers = readers, writers
        self._inbox: asyncio.Queue | None = None

    @classmethod
    def opened(cls, num_consumers: int) -> PipeTransport:
        """A pipe for each HTTP process (they fork, and keep their read ends)."""
        pipes = [mp.get_context("spawn").Pipe(duplex=False) for _ in range(num_consumers)]
        return cls([reader for reader, _ in pipes], [writer for _, writer in pipes])

    def __reduce__(self):  # a spawned worker gets the write ends only
        return PipeTransport, ([], self.writers)

    def send(self, item, consumer_id: int) -> None:
        """One message to HTTP process ``consumer_id`` (in a worker; blocks while its pipe
        is full)."""
        frame = _frame(item)
        if len(frame) > select.PIPE_BUF:
            frame = _frame(_too_large(item, len(frame)))
        os.write(self.writers[consumer_id].fileno(), frame)

    async def areceive(self, consumer_id: int = 0, timeout: float | None = None):
        """The next message for this HTTP process; ``queue.Empty`` after ``timeout`` s."""
        if self._inbox is None:
            self._inbox = asyncio.Queue()
            _read_into(self._inbox, self.readers[consumer_id].fileno())
        try:
            return await asyncio.wait_for(self._inbox.get(), timeout)
        except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
            raise Empty from None


LENGTH = struct.Struct("!I")
"""A message's length, before its bytes."""


def _frame(item) -> bytes:
    data = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
    return LENGTH.pack(len(data)) + data


def _too_large(item, size: int):
    """A LitServe response (``uid, (data, status, type, worker_id)``) replaced by a 500 that
    says why: the answers this server sends are a few hundred bytes."""
    uid, (_, _, response_type, worker_id) = item
    reason = f"the worker's answer is {size:,} bytes, over the transport's {select.PIPE_BUF:,}-byte limit"
    error = pickle.dumps(PickleableHTTPException(500, reason))
    return uid, (error, LitAPIStatus.ERROR, response_type, worker_id)


def _read_into(inbox: asyncio.Queue, fd: int) -> None:
    """Read whole messages from pipe ``fd`` into ``inbox`` whenever the running event loop
    sees it readable (a read may end inside a message; the rest waits for the next)."""
    os.set_blocking(fd, False)
    loop, pending = asyncio.get_running_loop(), bytearray()

    def readable() -> None:
        try:
            while chunk := os.read(fd, 1 << 16):
                pending.extend(chunk)
            loop.remove_reader(fd)  # end of file: every write end is closed
        except BlockingIOError:
            pass
        while len(pending) >= LENGTH.size:
            (size,) = LENGTH.unpack_from(pending)
            end = LENGTH.size + size
            if len(pending) < end:
                break
            inbox.put_nowait(pickle.loads(pending[LENGTH.size : end]))  # a worker's own pickle
            del pending[:end]

    loop.add_reader(fd, readable)


PR_SET_PDEATHSIG = 1
"""``prctl`` option: the signal this process gets when the thread that started it exits."""


def die_with_parent() -> None:
    """Get SIGTERM when the parent process dies, however it dies (Linux; elsewhere nothing).

    Called first thing in each process LitServe starts. A parent that died before the
    call is caught by its pid no longer being this process's parent. In the main process
    (LitServe's HTTP server in a thread of it, as on Windows) it does nothing: ``serve.py``
    must not stop because the shell that started it exits.
    """
    parent = mp.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent.pid:
        os.kill(os.getpid(), signal.SIGTERM)


def stop_on_signals() -> None:
    """In ``serve.py``'s main process: SIGTERM stops the server as Ctrl-C does (LitServe then
    ends its HTTP process and workers). The HTTP process, which LitServe forks from this
    one, inherits these handlers; there SIGINT and SIGTERM end the process quietly once
    uvicorn has shut down (uvicorn hands a signal it caught on to the handler it found),
    where a KeyboardInterrupt would print a traceback at every normal stop."""
    handler = functools.partial(_on_stop_signal, os.getpid())
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)


def _on_stop_signal(main_pid: int, signum, frame) -> None:
    if os.getpid() == main_pid:
        raise KeyboardInterrupt
    raise SystemExit(0)


def exit_quietly_on_interrupt() -> None:
    """In an inference worker (spawned, so it inherits no handler): Ctrl-C reaches every
    process of the terminal's group, and the worker leaves the stopping to the main process
    instead of printing a KeyboardInterrupt traceback."""
    signal.signal(signal.SIGINT, functools.partial(_on_stop_signal, None))


async def no_auth() -> None:
    """No authorisation, awaited in the event loop rather than run in a thread."""


class WorkerFailed(Exception):
    """A request the workers answered with an error: its HTTP status and one-line detail."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status, self.detail = status, detail

    @classmethod
    def from_response(cls, response) -> WorkerFailed:
        """As LitServe's route reads a worker's error: an ``HTTPException`` (pickled by the
        worker when it crossed the transport) keeps its status, anything else is a 500."""
        if isinstance(response, bytes):
            try:  # the worker process's own pickle, not outside input
                response = pickle.loads(response)
            except Exception:
                response = None
        status = getattr(response, "status_code", None)
        if isinstance(status, int):
            return cls(status, str(getattr(response, "detail", "")))
        return cls(500, "internal server error; see the server's log")


class FastQueueLitServer(ls.LitServer):
    """``ls.LitServer`` with a working ``fast_queue`` and a front door (module docstring).

    ``front_door`` is an ASGI middleware class and its options; it gets ``submit`` too, this
    server's :meth:`submit`, and serves the API's route itself.
    """

    def __init__(self, lit_api, *, front_door: tuple[type, dict] | None = None, **kwargs):
        if front_door is not None:
            door, options = front_door
            kwargs["middlewares"] = [(door, {**options, "submit": self.submit})]
        super().__init__(lit_api, **kwargs)

    async def submit(self, payload):
        """Queue one request for the workers and return their answer (in an HTTP process).

        What LitServe's route does after it has parsed the body: a fresh uid, an event in
        the response buffer that LitServe's response reader sets, the request on the API's
        queue. Raises :class:`WorkerFailed` when the workers answered with an error.
        """
        uid = uuid.uuid4().hex
        item = ResponseBufferItem(event=asyncio.Event())
        self.response_buffer[uid] = item
        queue = self._get_request_queue(self.lit_api.api_path)
        queue.put((self.app.response_queue_id, uid, time.monotonic(), payload))
        try:
            await item.event.wait()
        finally:
            self.response_buffer.pop(uid, None)
        response, status = item.response
        if status == LitAPIStatus.ERROR:
            raise WorkerFailed.from_response(response)
        return response

    def _init_manager(self, num_api_servers: int):
        """LitServe's, except that its Manager process stops with this one and that with
        ``fast_queue`` requests and responses go over pipes."""
        manager = SyncManager(ctx=mp.get_context())
        manager.start(initializer=die_with_parent)
        self.transport_config.manager = manager
        self.transport_config.num_consumers = num_api_servers
        self.workers_setup_status = manager.dict()
        self._shutdown_event = manager.Event()
        for lit_api in self.litapi_connector:
            queue = mp.get_context("spawn").Queue() if self.use_zmq else manager.Queue()
            self.litapi_request_queues[lit_api.api_path] = queue
        if self._logger_connector._loggers:
            self.logger_queue = manager.Queue()
        self._logger_connector.run(self)
        if self.use_zmq:
            self._transport = PipeTransport.opened(num_api_servers)
        else:
            self._transport = create_transport_from_config(self.transport_config)
        return manager

    @asynccontextmanager
    async def lifespan(self, app):
        """LitServe's, in an HTTP process that stops with the main process."""
        die_with_parent()
        async with super().lifespan(app):
            yield

    def setup_auth(self, lit_api: ls.LitAPI | None = None):
        auth = super().setup_auth(lit_api)
        return no_auth if auth is litserve_server.no_auth else auth
