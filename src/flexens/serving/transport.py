"""``LitServer`` without three per-request costs of LitServe 0.2.19's plumbing.

1. ``fast_queue=True`` is silently dropped (LitServe issue #751, open PR #752): the
   transport type goes to ``TransportConfig`` under a wrong keyword, so every response
   travels through a multiprocessing Manager queue (a round trip through a third process)
   and the HTTP process waits for each one in a thread. Its ZeroMQ wiring also swaps the
   broker's two addresses, so setting the type alone would leave every request hanging.
   :class:`FastQueueLitServer` builds the ZeroMQ transport as PR #752 does.
2. With it, requests go to the workers through a plain ``multiprocessing.Queue`` instead of
   a Manager queue: a pipe, without the Manager's round trip per request.
3. Without an API key, LitServe guards the endpoint with a synchronous no-op dependency,
   which FastAPI runs in a thread pool: one thread hop per request for nothing. An async
   no-op takes its place (``LIT_SERVER_API_KEY`` and a ``LitAPI.authorize`` still apply).

On a one-core server these made up about a third of the CPU per request
(``benchmarks/serve_load.py``; BENCHMARKS.md). Drop each once a LitServe release does it.
"""

from __future__ import annotations

import multiprocessing as mp

import litserve as ls
from litserve import server as litserve_server
from litserve.transport.zmq_queue import Broker
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

    def close(self, **kwargs) -> None:
        """Close this process's socket if it opened one (LitServe closes the transport in
        the parent process too, which never does: the base class raises there)."""
        if self._zmq is not None:
            self._zmq.close()

    def __reduce__(self):  # the broker thread stays in the process that started it
        return BrokeredZMQTransport, (None, self.backend_address, self.frontend_address)


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
