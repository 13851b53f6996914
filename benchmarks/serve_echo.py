"""LitServe with nothing to compute: the floor under ``serve.py``'s batch-1 overhead.

The same batched loop (:class:`flexens.serving.api.DrainingLoop`), transport, process
layout and path into the workers' queue (a front door that reads the body and hands it to
``FastQueueLitServer.submit``) as ``serve.py``, with an API that answers at once.
``serve_load.py`` times it with the same keep-alive client as the real server, so what is
left of the overhead above this floor is flexens' own (the gate's checks, image decoding,
the pixels to the worker and the members' answer back), not LitServe's.

Run: ``python benchmarks/serve_echo.py PORT``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import litserve as ls

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from flexens.serving.api import DrainingLoop  # noqa: E402
from flexens.serving.gate import read_body, reply  # noqa: E402
from flexens.serving.transport import FastQueueLitServer, stop_on_signals  # noqa: E402


class EchoAPI(ls.LitAPI):
    def setup(self, device) -> None:
        pass

    def decode_request(self, request):
        return request

    def batch(self, inputs):
        return inputs

    def predict(self, x):
        return x

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        return {"ok": True}


class EchoDoor:
    """The bare front door: POST /predict's body to the workers, their answer back."""

    def __init__(self, app, *, submit) -> None:
        self.app, self.submit = app, submit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/predict":
            return await self.app(scope, receive, send)
        body = await read_body(scope, receive, 1 << 24)
        answer = await self.submit({"x": body})
        await reply(send, 200, json.dumps(answer).encode(), b"application/json")


if __name__ == "__main__":
    stop_on_signals()  # as serve.py: SIGTERM stops it as Ctrl-C does
    api = EchoAPI(max_batch_size=32, batch_timeout=0.0, loop=DrainingLoop())
    server = FastQueueLitServer(api, accelerator="cpu", fast_queue=True, front_door=(EchoDoor, {}))
    server.run(port=int(sys.argv[1]), generate_client_file=False, log_level="warning")
