"""How much halting can give a server on this CPU at a given concurrency, and how heavy the
members would have to be for more: worker CPU per request, full against flexible, for the
served members and for the same architecture made wider.

    python benchmarks/serve_bound.py --update-docs
    python benchmarks/serve_bound.py --data digits --widths 16 --images 60 \\
        --members-dir outputs/members/digits-small_cnn \\
        --thresholds outputs/members/digits-small_cnn/thresholds.json      # the smoke test

On one core a server's throughput is about one over its CPU time per request
(BENCHMARKS.md, serving: 1,020 requests/s predicted from it, 1,014 measured). That time is
the HTTP side, about the same in both modes, plus the workers' member calls. At
concurrency ``c`` a worker's batch holds up to ``c`` requests: full runs every member on all
of them, flexible runs member ``k`` on the ones still undecided. This script

- takes the exit stages of the served thresholds on ``--images`` test images (the real
  members, decoded as the server decodes them);
- times one member at every batch size from 1 to ``c`` at each width, interleaved, on one
  thread as the served workers run (random weights: a call's cost does not depend on them;
  the member in its inference form, as every loader builds it);
- draws batches of ``c`` requests from those exits, and prices each batch as full and as
  flexible execution run it.

It prints the workers' ms per request, their ratio, and the ratio with the HTTP side of
the last ``serve_load.py`` run (``benchmarks/results/serve_load.json``) added to both.
Wider members make the HTTP side matter less; what stays is that flexible's later members
run on sub-batches of a few requests, which cost more per request than full's batch of
``c``. Every modelled batch holds exactly ``c`` requests, more than ``c`` clients that wait
for their answers keep queued, and a fuller batch favours flexible (its sub-batches grow
with it): the served width's row is checked against the CPU split ``serve_load.py``
measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import serve_load  # noqa: E402
from cells import add_served_ensemble, one_line_errors, publish, repo_path  # noqa: E402

from flexens.allocator import retain_freed_memory  # noqa: E402
from flexens.artifacts import write_json  # noqa: E402
from flexens.latency import Budget, adaptive_interleaved, machine_info, robust_mean  # noqa: E402
from flexens.members.inference_form import inference_network  # noqa: E402
from flexens.members.networks import create_network  # noqa: E402

DRAWS = 20_000
"""Modelled worker batches per width (seeded): enough for three significant figures."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="cifar10", help="cifar10, or digits for a smoke test")
    parser.add_argument("--images", type=int, default=2000, help="test images for the exits")
    add_served_ensemble(parser)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--widths", default="16,32,48,64", help="member widths, comma-separated")
    parser.add_argument("--seconds", type=float, default=4.0, help="timing budget per width")
    parser.add_argument(
        "--serve-load", type=Path, default=ROOT / "benchmarks/results/serve_load.json"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/serve_bound.json")
    parser.add_argument("--update-docs", action="store_true")
    return parser.parse_args(argv)


def served_exits(args: argparse.Namespace) -> tuple[np.ndarray, torch.Tensor, int]:
    """The served thresholds' exit stage (0-based) on the test images, one decoded image
    and the number of members."""
    with tempfile.TemporaryDirectory() as tmp:
        images = serve_load.labelled_images(args.data, args.images, Path(tmp))
        module, xs = serve_load.in_process_module(args, images)
    with torch.inference_mode():
        exits = module(torch.stack(xs)).exit_stage.numpy()
    return exits, xs[0].unsqueeze(0), module.num_members


def served_arch(thresholds: Path, members_dir: Path) -> dict:
    """The architecture record of the first served member; it must have a width to scale."""
    if not thresholds.is_file():
        raise FileNotFoundError(f"--thresholds {thresholds} does not exist; run calibrate.py first")
    first = json.loads(thresholds.read_text())["members"][0]["path"]
    arch = json.loads((members_dir / first).with_suffix(".json").read_text())["arch"]
    if "width" not in arch:
        raise SystemExit(
            f"error: the served members ({arch['arch']}) have no width setting to scale; "
            "serve_bound.py needs members like model=small_cnn"
        )
    return arch


def call_ms(arch: dict, width: int, example: torch.Tensor, concurrency: int, seconds: float):
    """Mean ms of one member call at each batch size 1..``concurrency`` (index 0: batch 1),
    the sizes interleaved in rounds, on one thread."""
    spec = {**arch, "pretrained": None, "width": width}
    network = inference_network(create_network(**spec))
    batches = {
        b: example.expand(b, *example.shape[1:]).contiguous(memory_format=torch.channels_last)
        for b in range(1, concurrency + 1)
    }
    fns = {str(b): (lambda x=x: network(x)) for b, x in batches.items()}
    torch.set_num_threads(1)
    times = adaptive_interleaved(
        fns, torch.device("cpu"), Budget(seconds=seconds), f"width {width}"
    )
    params = sum(p.numel() for p in network.parameters())
    return np.array([robust_mean(times[str(b)]) * 1e3 for b in batches]), params


def worker_ms(exits: np.ndarray, calls: np.ndarray, members: int, concurrency: int) -> tuple:
    """Workers' ms per request, full and flexible, over seeded batches of ``concurrency``
    requests drawn from ``exits``."""
    rng = np.random.default_rng(0)
    batch = exits[rng.integers(len(exits), size=(DRAWS, concurrency))]
    reach = (batch[:, :, None] >= np.arange(members)).sum(axis=1)  # (draws, members)
    cost = np.where(reach > 0, calls[np.maximum(reach, 1) - 1], 0.0).sum(axis=1)
    full = members * calls[concurrency - 1] / concurrency
    return float(full), float(cost.mean() / concurrency)


def run(args: argparse.Namespace) -> dict:
    arch = served_arch(args.thresholds, args.members_dir)
    exits, example, members = served_exits(args)
    load = json.loads(args.serve_load.read_text()) if args.serve_load.is_file() else None
    c = args.concurrency
    measured = None
    if load and f"full@{c}" in load and f"flexible@{c}" in load:
        full, flexible = load[f"full@{c}"], load[f"flexible@{c}"]
        measured = {
            "http_ms": (full["cpu_http_ms"] + flexible["cpu_http_ms"]) / 2,
            "full_workers_ms": full["cpu_workers_ms"],
            "flexible_workers_ms": flexible["cpu_workers_ms"],
            "throughput_ratio": flexible["throughput_rps"] / full["throughput_rps"],
            "machine": load["machine"],
        }
    rows = []
    for width in (int(w) for w in args.widths.split(",")):
        calls, params = call_ms(arch, width, example, c, args.seconds)
        full, flexible = worker_ms(exits, calls, members, c)
        row = {
            "width": width,
            "params": params,
            "call_ms": calls.tolist(),
            "full_workers_ms": full,
            "flexible_workers_ms": flexible,
            "workers_ratio": full / flexible,
        }
        if measured:
            h = measured["http_ms"]
            row["with_http_ratio"] = (h + full) / (h + flexible)
        rows.append(row)
    return {
        "machine": machine_info(torch.device("cpu")),
        "thresholds": repo_path(args.thresholds),
        "images": len(exits),
        "avg_members": float(exits.mean() + 1),
        "members": members,
        "served_width": arch.get("width"),
        "concurrency": c,
        "measured": measured,
        "widths": rows,
    }


def markdown(result: dict) -> str:
    m, c, measured = result["machine"], result["concurrency"], result["measured"]
    lines = [
        f"Machine: {m['device']} ({m['cpu_count']} cores), torch {m['torch']}, Python "
        f"{m['python']}; {m['date']}. Command: `python benchmarks/serve_bound.py`. Exits of "
        f"`{result['thresholds']}` on {result['images']} test images "
        f"({result['avg_members']:.2f} of {result['members']} members on average); member calls "
        f"timed at batch 1 to {c}, one thread, interleaved; {DRAWS:,} seeded batches of {c} "
        "requests per width.",
        "",
        f"| member width | parameters | call ms at batch 1 | at batch {c} | workers ms/request, "
        f"full | flexible | workers: full / flexible | with the HTTP side |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["widths"]:
        served = " (served)" if r["width"] == result["served_width"] else ""
        http = f"{r['with_http_ratio']:.2f}×" if "with_http_ratio" in r else "–"
        lines.append(
            f"| {r['width']}{served} | {r['params'] / 1e6:.2f} M | {r['call_ms'][0]:.3f} "
            f"| {r['call_ms'][-1]:.3f} | {r['full_workers_ms']:.3f} "
            f"| {r['flexible_workers_ms']:.3f} | {r['workers_ratio']:.2f}× | {http} |"
        )
    lines.append("")
    lines.append(
        f"Ceiling if every call cost per request what full's batch of {c} does: "
        f"{result['members'] / result['avg_members']:.2f}× ({result['members']} members over "
        f"{result['avg_members']:.2f})."
    )
    if measured:
        lines.append(
            f"Measured by the last `serve_load.py` run ({measured['machine']}; concurrency {c}, "
            f"server on its own core): HTTP side {measured['http_ms']:.2f} ms per request (the "
            f"mean of both modes, added to both above), workers {measured['full_workers_ms']:.2f}"
            f" ms full and {measured['flexible_workers_ms']:.2f} ms flexible "
            f"({measured['full_workers_ms'] / measured['flexible_workers_ms']:.2f}×), "
            f"throughput {measured['throughput_ratio']:.2f}× full's."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    retain_freed_memory()  # as every flexens process runs (flexens.allocator)
    with one_line_errors():
        result = run(args)
    write_json(args.out, result)
    section = markdown(result)
    publish(section, "serve_bound", args.update_docs)


if __name__ == "__main__":
    main()
