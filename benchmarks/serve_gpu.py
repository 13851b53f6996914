"""serve.py on a GPU: its answers and its batch-1 latency against the module in-process.

    python benchmarks/serve_gpu.py --device cuda                 # on a GPU machine
    python benchmarks/serve_gpu.py --device cpu --images 20     # anywhere (the smoke test)
    python benchmarks/serve_gpu.py --render benchmarks/results/serve_gpu.json --update-docs

For each mode (flexible, full), on a GPU with its members as CUDA graphs
(``serve.cuda_graphs=true``, the default) and eagerly, ``serve.py device=...`` starts on
the loopback interface and gets ``--images`` test images one at a time on one keep-alive
connection, interleaved in rounds with ``FlexibleEnsembleModule`` called in-process on the
same device, the same way, on the same decoded images (CUDA synchronised after every
call). Every answer (class and members used) is compared with the in-process module on
that device and on this machine's CPU: on a GPU the convolutions run in TF32 by default,
which may move an exit.

A GPU machine lent for minutes has no image tree: point ``FLEXENS_CIFAR10_ROOT`` at a
folder holding ``test/<class>/*.jpg``, a few hundred files copied from the real one.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("FLEXENS_ROOT", str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import serve_load  # noqa: E402
from cells import add_served_ensemble, publish  # noqa: E402

from flexens.allocator import retain_freed_memory  # noqa: E402
from flexens.artifacts import write_json  # noqa: E402
from flexens.latency import machine_info, resolve_device, synchronize  # noqa: E402

ROUNDS = 5
"""Rounds of the comparison; each times a slice in-process, then the same through the server."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--data", default="cifar10", help="cifar10, or digits for a smoke test")
    parser.add_argument("--images", type=int, default=200, help="test images, each sent once")
    add_served_ensemble(parser)
    parser.add_argument("--port", type=int, default=8792)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/serve_gpu.json")
    parser.add_argument("--render", type=Path, metavar="JSON", help="print a result (no run)")
    parser.add_argument("--update-docs", action="store_true", help="rewrite BENCHMARKS.md's table")
    args = parser.parse_args(argv)
    args.server_cpus = None  # serve_load.Server's: no pinning
    return args


def answer_of(module, x: torch.Tensor) -> tuple[float, tuple[int, int]]:
    """Seconds of one synchronised in-process call at batch 1, and (class, members used)."""
    synchronize(x.device)
    start = time.perf_counter()
    out = module(x[None])
    synchronize(x.device)
    seconds = time.perf_counter() - start
    return seconds, (int(out.prediction[0]), int(out.exit_stage[0]) + 1)


def ask_server(connection, body: bytes) -> tuple[float, tuple[int, int]]:
    """Seconds of one POST /predict, and the (class, members used) it answered."""
    seconds, payload = serve_load.round_trip(connection, body)
    answer = json.loads(payload)
    return seconds, (int(answer["class_index"]), int(answer["members_used"]))


def compare(
    args: argparse.Namespace, mode: str, graphs: bool, module_cpu, xs: list, bodies: list
) -> dict:
    device = resolve_device(args.device)
    module = copy.deepcopy(module_cpu).to(device).eval()
    module.set_mode(mode)
    module_cpu.set_mode(mode)
    module.cuda_graphs = graphs
    on_device = [x.to(device) for x in xs]
    module.prepare_graphs(on_device[0][None], 1)
    times: dict[str, list[float]] = {"module": [], "server": []}
    answers: dict[str, list] = {"module": [None] * len(xs), "server": [None] * len(xs)}
    slices = np.array_split(np.arange(len(xs)), ROUNDS)
    with (
        serve_load.Server(
            args,
            f"device={args.device}",
            f"serve.mode={mode}",
            f"serve.cuda_graphs={str(graphs).lower()}",
        ) as server,
        serve_load.keep_alive(server.url) as connection,
        torch.inference_mode(),
    ):
        for i in range(min(20, len(xs))):  # warm-up: both pay their first calls here
            answer_of(module, on_device[i])
            ask_server(connection, bodies[i])
        for picks in slices:
            for name, call in (
                ("module", lambda i: answer_of(module, on_device[i])),
                ("server", lambda i: ask_server(connection, bodies[i])),
            ):
                for i in picks:
                    seconds, answers[name][i] = call(i)
                    times[name].append(seconds)
        cpu = [answer_of(module_cpu, x)[1] for x in xs]
    served = answers["server"]
    module_ms, server_ms = serve_load.timing(times["module"]), serve_load.timing(times["server"])
    return {
        "module": module_ms,
        "server": server_ms,
        "overhead_ms": server_ms["mean_ms"] - module_ms["mean_ms"],
        "avg_members": float(np.mean([a[1] for a in served])),
        "same_as_module": sum(a == b for a, b in zip(served, answers["module"], strict=True)),
        "same_as_cpu": sum(a == b for a, b in zip(served, cpu, strict=True)),
        "same_class_as_cpu": sum(a[0] == b[0] for a, b in zip(served, cpu, strict=True)),
    }


def markdown(result: dict) -> str:
    m, n = result["machine"], result["images"]
    lines = [
        f"Machine: {m['device']} ({m['cpu_count']} CPU cores), torch {m['torch']}, Python "
        f"{m['python']}; {m['date']}. Command: `python benchmarks/serve_gpu.py --device "
        f"{result['device']}`. {n} {result['data']} test images, one request at a time, interleaved "
        f"in {ROUNDS} rounds with the module in-process on the same device; thresholds "
        f"`{result['thresholds']}`. Answers: (class, members used) equal, out of {n}.",
        "",
        "| configuration | avg members | server mean ms | p50 | p99 | in-process mean ms | p50 "
        "| overhead ms | same as in-process | same as CPU (class) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, r in result["configurations"].items():
        s, i = r["server"], r["module"]
        lines.append(
            f"| {name} | {r['avg_members']:.2f} | {s['mean_ms']:.2f} | {s['p50_ms']:.2f} "
            f"| {s['p99_ms']:.2f} | {i['mean_ms']:.2f} | {i['p50_ms']:.2f} "
            f"| {r['overhead_ms']:+.2f} | {r['same_as_module']} / {n} "
            f"| {r['same_as_cpu']} / {n} ({r['same_class_as_cpu']}) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    retain_freed_memory()  # as every flexens process runs (flexens.allocator)
    section = markdown(json.loads(args.render.read_text())) if args.render else run(args)
    publish(section, "serve_gpu", args.update_docs)


def run(args: argparse.Namespace) -> str:
    """Both servers against the module; writes ``--out`` and returns the table."""
    with tempfile.TemporaryDirectory() as tmp:
        images = serve_load.labelled_images(args.data, args.images, Path(tmp))
        module_cpu, xs = serve_load.in_process_module(args, images)
        bodies = [Path(p).read_bytes() for p, _ in images]
    result = {
        "machine": machine_info(resolve_device(args.device)),
        "device": args.device,
        "data": args.data,
        "images": len(images),
        "thresholds": str(args.thresholds.relative_to(ROOT))
        if args.thresholds.is_relative_to(ROOT)
        else str(args.thresholds),
        "configurations": {
            f"{mode}{', CUDA-graph members' if graphs else ''}": compare(
                args, mode, graphs, module_cpu, xs, bodies
            )
            for graphs in ((True, False) if args.device.startswith("cuda") else (False,))
            for mode in ("flexible", "full")
        },
    }
    write_json(args.out, result)
    print(f"results: {args.out}")
    return markdown(result)


if __name__ == "__main__":
    main()
