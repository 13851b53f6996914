"""A/B of two servers on the same machine: ``serve.py`` with override A against override
B, or the ``serve.py`` of one commit against another's, alternated, each server fresh and
given the same untimed warm-up.

    python benchmarks/serve_ab.py serve.batch_timeout=0 serve.batch_timeout=0.002
    python benchmarks/serve_ab.py serve.fast_queue=false serve.fast_queue=true --modes flexible
    python benchmarks/serve_ab.py @d0ca1b8 @HEAD --modes flexible

A variant ``@REV`` runs the ``serve.py`` and ``src/`` of that git revision of this
repository (checked out into a temporary worktree), with this checkout's members and
data. Each variant serves every mode of ``--modes`` at concurrency 8, closed loop, with
the server on its own core and locust on another (as ``serve_load.py``), and reports
throughput, p99 and the server's CPU per request (HTTP side + workers), so a difference
in throughput can be read against the work each request cost; then the mean and median
of one request at a time (batch 1, ``serve_load.py``'s client) over the same images.
Other options are ``serve_load.py``'s (``--thresholds``, ``--seconds``, ...).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load  # noqa: E402

USERS = 8


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("a", help="a serve.py override (serve.batch_timeout=0) or @REV")
    parser.add_argument("b", help="the variant to compare it with")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["full", "flexible"])
    ours, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    for variant in (ours.a, ours.b):
        if "=" not in variant and not variant.startswith("@"):
            parser.error(f"{variant!r} is neither an override (KEY=VALUE) nor a revision (@REV)")
    args = serve_load.parse_args(rest)
    if args.client_cpus is not None:
        os.sched_setaffinity(0, args.client_cpus)
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as checkouts:
        images = serve_load.labelled_images(args.data, args.images, Path(tmp))
        images_file = Path(tmp) / "images.json"
        images_file.write_text(json.dumps(images))
        bodies = [Path(p).read_bytes() for p, _ in images]
        servers = {v: checkouts.enter_context(server_of(v, Path(tmp))) for v in (ours.a, ours.b)}
        for _ in range(ours.repeats):
            for variant, (root, overrides) in servers.items():
                for mode in ours.modes:
                    with serve_load.Server(
                        args, f"serve.mode={mode}", *overrides, root=root
                    ) as server:
                        serve_load.run_locust(
                            server.url, images_file, USERS, 0, args, seconds=serve_load.WARMUP_S
                        )
                        level = functools.partial(
                            serve_load.run_locust, server.url, images_file, USERS, 0, args
                        )
                        result = serve_load.cpu_per_request(server, level)
                        result["batch1"] = one_at_a_time(server.url, bodies)
                    runs.setdefault((variant, mode), []).append(result)
                    print(
                        variant,
                        mode,
                        {k: result[k] for k in ("throughput_rps", "p99_ms", "batch1")},
                    )
    print(f"{serve_load.placement(args)}; concurrency {USERS}, {ours.repeats} runs each:")
    for (variant, mode), results in runs.items():
        rps = [r["throughput_rps"] for r in results]
        p99 = [r["p99_ms"] for r in results]
        cpu = [r.get("cpu_http_ms", np.nan) + r.get("cpu_workers_ms", np.nan) for r in results]
        means = ", ".join(f"{r['batch1']['mean_ms']:.2f}" for r in results)
        medians = ", ".join(f"{r['batch1']['p50_ms']:.2f}" for r in results)
        print(
            f"  {variant} {mode}: {', '.join(f'{x:.0f}' for x in rps)} requests/s "
            f"(median {np.median(rps):.0f}), p99 {', '.join(f'{x:.0f}' for x in p99)} ms, "
            f"server CPU {', '.join(f'{x:.2f}' for x in cpu)} ms/request; "
            f"batch 1: mean {means} ms, median {medians} ms"
        )


@contextmanager
def server_of(variant: str, tmp: Path):
    """The checkout root and overrides a variant runs with: this checkout and the override,
    or a temporary worktree of revision ``@REV`` (removed afterwards) and none."""
    if not variant.startswith("@"):
        yield serve_load.ROOT, (variant,)
        return
    revision = variant[1:]
    tree = tmp / f"rev-{len(list(tmp.glob('rev-*')))}"
    git = ["git", "-C", str(serve_load.ROOT)]
    added = subprocess.run(
        [*git, "worktree", "add", "--detach", str(tree), revision], capture_output=True, text=True
    )
    if added.returncode != 0:
        sys.exit(f"error: cannot check out {variant}: {added.stderr.strip().splitlines()[-1]}")
    try:
        yield tree, ()
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(tree)], check=False)


BATCH1_WARMUP = 20
"""Requests sent before the batch-1 timing, untimed."""


def one_at_a_time(url: str, bodies: list[bytes]) -> dict:
    """Mean and median ms of one request at a time over ``bodies``, after a few untimed."""
    with serve_load.keep_alive(url) as connection:
        for body in bodies[:BATCH1_WARMUP]:
            serve_load.round_trip(connection, body)
        return serve_load.timing([serve_load.round_trip(connection, b)[0] for b in bodies])


if __name__ == "__main__":
    main()
