"""``LitServer`` without three per-request costs of LitServe 0.2.19's plumbing.

1. ``fast_queue=True`` is silently dropped (LitServe issue #751, open PR #752): the
   transport type goes to ``TransportConfig`` under a wrong keyword, so every response
   travels through a multiprocessing Manager queue (a round trip through a third process)
   and the HTTP process waits for each one in a thread. Its ZeroMQ wiring also swaps the
   broker's two addresses, so setting the type alone would leave every request hanging.
   :class:`FastQueueLitServer` builds the ZeroMQ transport as PR #752 does; each worker's
   publisher connects when the worker starts (:func:`publisher`) and sends no ping.
2. With it, requests go to the workers through a plain ``multiprocessing.Queue`` instead of
   a Manager queue: a pipe, without the Manager's round trip per request.
3. Without an API key, LitServe guards the endpoint with a synchronous no-op dependency,
   which FastAPI runs in a thread pool: one thread hop per request for nothing. An async
   no-op takes its place (``LIT_SERVER_API_KEY`` and a ``LitAPI.authorize`` still apply).

On a one-core server the transport alone gives flexible serving 15–27 % more throughput
(``benchmarks/serve_transport.py``; BENCHMARKS.md). Drop each fix once LitServe has it.
"""

from __future__ import annotations

import multiprocessing as mp

import litserve as ls
import zmq
from litserve import server as litserve_server
from litserve.transport.zmq_queue import Broker, Producer
from litserve.transport.zmq_transport import ZMQTransport


class BrokeredZMQTransport(ZMQTransport):
    """ZeroMQ responses through a broker this process started: workers publish to its
    backend, HTTP processes subscribe at its frontend."""

    def __init__(self, broker: Broker | None, backend_address: str, frontend_address: str):
        super().__init__(backend_address, frontend_address)
        self.broker = broker

    @classmethod
    def started(cls) -> BrokeredZMQTransport:
        broker = Broker()
        broker.start()
        return cls(broker, broker.backend_address, broker.frontend_address)

    def setup(self, operation, consumer_id: int | None = None) -> None:
        """As LitServe's, but a publisher sends no ``__ping__``: a subscriber that received one
        would fail to unpickle it and LitServe's response loop would stop for good."""
        if operation == zmq.PUB:
            self._zmq = Producer(address=self.backend_address)
        else:
            super().setup(operation, consumer_id)

    def close(self, **kwargs) -> None:
        """Close this process's socket if it opened one (LitServe closes the transport in
        the parent process too, which never does: the base class raises there)."""
        if self._zmq is not None:
            self._zmq.close()

    def __reduce__(self):  # the broker thread stays in the process that started it
        return publisher, (self.backend_address, self.frontend_address)


def publisher(backend_address: str, frontend_address: str) -> BrokeredZMQTransport:
    """An inference worker's copy of the transport, connected at once.

    LitServe pickles the transport only into the workers it spawns (its HTTP processes are
    forked or threads, and subscribe when they start). A ZeroMQ publisher drops what it
    sends before the broker has told it who subscribes, and LitServe's publisher connects
    at the first response and waits only 0.1 s: on a busy machine that first answer could
    be lost and its request never answered. Connecting while the worker loads its model
    leaves seconds for that.
    """
    transport = BrokeredZMQTransport(None, backend_address, frontend_address)
    transport.setup(zmq.PUB)
    return transport


async def no_auth() -> None:
    """No authorisation, awaited in the event loop rather than run in a thread."""


class FastQueueLitServer(ls.LitServer):
    """``ls.LitServer`` with a working ``fast_queue`` (see the module docstring)."""

    def _init_manager(self, num_api_servers: int):
        manager = super()._init_manager(num_api_servers)
        if self.use_zmq:
            self._transport = BrokeredZMQTransport.started()
            for path in self.litapi_request_queues:
                self.litapi_request_queues[path] = mp.get_context("spawn").Queue()
        return manager

    def setup_auth(self, lit_api: ls.LitAPI | None = None):
        auth = super().setup_auth(lit_api)
        return no_auth if auth is litserve_server.no_auth else auth
