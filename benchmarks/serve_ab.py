"""A/B of two server settings on the same machine: ``serve.py`` with override A against
override B, alternated, each server fresh and given the same untimed warm-up.

    python benchmarks/serve_ab.py serve.batch_timeout=0 serve.batch_timeout=0.002
    python benchmarks/serve_ab.py serve.fast_queue=false serve.fast_queue=true --modes flexible

Each variant serves every mode of ``--modes`` at concurrency 8, closed loop, with the
server on its own core and locust on another (as ``serve_load.py``), and reports
throughput, p99 and the server's CPU per request (HTTP side + workers), so a difference
in throughput can be read against the work each request cost. Other options are
``serve_load.py``'s (``--thresholds``, ``--seconds``, ...).
"""

from __future__ import annotations

import argparse
import functools
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
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("a", help="a serve.py override, e.g. serve.batch_timeout=0")
    parser.add_argument("b", help="the override to compare it with")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["full", "flexible"])
    ours, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    for override in (ours.a, ours.b):
        if "=" not in override:
            parser.error(f"{override!r} is not an override; write KEY=VALUE")
    args = serve_load.parse_args(rest)
    if args.client_cpus is not None:
        os.sched_setaffinity(0, args.client_cpus)
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        images = serve_load.labelled_images(args.data, args.images, Path(tmp))
        images_file = Path(tmp) / "images.json"
        images_file.write_text(json.dumps(images))
        for _ in range(ours.repeats):
            for override in (ours.a, ours.b):
                for mode in ours.modes:
                    with serve_load.Server(args, f"serve.mode={mode}", override) as server:
                        serve_load.run_locust(
                            server.url, images_file, USERS, 0, args, seconds=serve_load.WARMUP_S
                        )
                        level = functools.partial(
                            serve_load.run_locust, server.url, images_file, USERS, 0, args
                        )
                        result = serve_load.cpu_per_request(server, level)
                    runs.setdefault((override, mode), []).append(result)
                    print(override, mode, {k: result[k] for k in ("throughput_rps", "p99_ms")})
    print(f"{serve_load.placement(args)}; concurrency {USERS}, {ours.repeats} runs each:")
    for (override, mode), results in runs.items():
        rps = [r["throughput_rps"] for r in results]
        p99 = [r["p99_ms"] for r in results]
        cpu = [r.get("cpu_http_ms", np.nan) + r.get("cpu_workers_ms", np.nan) for r in results]
        print(
            f"  {override} {mode}: {', '.join(f'{x:.0f}' for x in rps)} requests/s "
            f"(median {np.median(rps):.0f}), p99 {', '.join(f'{x:.0f}' for x in p99)} ms, "
            f"server CPU {', '.join(f'{x:.2f}' for x in cpu)} ms/request"
        )


if __name__ == "__main__":
    main()
