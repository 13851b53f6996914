"""LitServe with nothing to compute: the floor under ``serve.py``'s batch-1 overhead.

The same batched loop (:class:`flexens.serving.api.DrainingLoop`), transport and process
layout as ``serve.py``, with an API that answers at once. ``serve_load.py`` times it with
the same keep-alive client as the real server, so what is left of the overhead above this
floor is flexens' own (the gate, image decoding, the payload), not LitServe's.

Run: ``python benchmarks/serve_echo.py PORT``.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import litserve as ls

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from flexens.serving.api import DrainingLoop  # noqa: E402
from flexens.serving.transport import FastQueueLitServer  # noqa: E402


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


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # stop as on Ctrl-C: LitServe ends its workers (as serve.py does)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    api = EchoAPI(max_batch_size=32, batch_timeout=0.0, loop=DrainingLoop())
    server = FastQueueLitServer(api, accelerator="cpu", fast_queue=True)
    server.run(port=int(sys.argv[1]), generate_client_file=False, log_level="warning")
