"""A/B of the server's transport: ``serve.fast_queue=false`` (LitServe's Manager queues, as
LitServe 0.2.19 runs whatever ``fast_queue`` says) against ``true`` (ZeroMQ responses and a
pipe for requests, ``flexens/serving/transport.py``), alternated on the same machine.

Flexible mode at concurrency 8, closed loop, with the server on its own core and locust on
another (as ``serve_load.py``); each server gets the same untimed warm-up first.

Run: ``python benchmarks/serve_transport.py [--repeats 2] [--thresholds FILE]``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load  # noqa: E402

USERS = 8


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    repeats = 2
    if "--repeats" in argv:
        i = argv.index("--repeats")
        repeats = int(argv[i + 1])
        del argv[i : i + 2]
    args = serve_load.parse_args(argv)
    if args.client_cpus is not None:
        os.sched_setaffinity(0, args.client_cpus)
    runs: dict[str, list[dict]] = {"false": [], "true": []}
    with tempfile.TemporaryDirectory() as tmp:
        images = serve_load.labelled_images(args.data, args.images, Path(tmp))
        images_file = Path(tmp) / "images.json"
        images_file.write_text(json.dumps(images))
        for _ in range(repeats):
            for fast in runs:
                with serve_load.Server(args, f"serve.fast_queue={fast}") as server:
                    serve_load.run_locust(
                        server.url, images_file, USERS, 0, args, seconds=serve_load.WARMUP_S
                    )
                    result = serve_load.run_locust(server.url, images_file, USERS, 0, args)
                runs[fast].append(result)
                print(f"fast_queue={fast}", {k: result[k] for k in ("throughput_rps", "p99_ms")})
    print(f"{serve_load.placement(args)}; flexible, concurrency {USERS}, {repeats} runs each:")
    for fast, results in runs.items():
        rps = [r["throughput_rps"] for r in results]
        p99 = [r["p99_ms"] for r in results]
        print(
            f"  serve.fast_queue={fast}: {', '.join(f'{x:.0f}' for x in rps)} requests/s "
            f"(median {np.median(rps):.0f}), p99 {', '.join(f'{x:.0f}' for x in p99)} ms"
        )


if __name__ == "__main__":
    main()
