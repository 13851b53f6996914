"""Freed memory kept or handed back (``flexens.allocator``): a member's cost at the serving
batch, its page faults, and what a latency profile reads, with glibc's defaults and with
flexens' setting.

    python benchmarks/allocator.py --update-docs
    python benchmarks/allocator.py --pairs 1 --profiles 1 --batch-size 64 \\
        --members-dir outputs/members/digits-small_cnn \\
        --thresholds outputs/members/digits-small_cnn/thresholds.json   # the smoke test

Each arm runs in a fresh process (the setting is process-wide, and what glibc does by
default depends on what the process allocated before), the two alternating in ``--pairs``
pairs so that the machine's drift hits both alike. In each process: one served member at
the serving batch, timed on one thread and on the profile's thread count after a warm-up,
with the minor page faults per call (``getrusage``); then ``--profiles`` latency profiles
of all the members, one after another, each read as the members' mean batch-1 and
serving-batch cost, as the benchmark's drift check reads them.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cells import add_served_ensemble, one_line_errors, publish, repo_path  # noqa: E402

from flexens.artifacts import write_json  # noqa: E402

ARMS = ("default", "retained")
"""glibc's defaults, and :func:`flexens.allocator.retain_freed_memory`."""
CALLS = 20
"""Timed member calls per thread count in each process, after as many untimed."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_served_ensemble(parser)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=3, help="processes per arm, alternating")
    parser.add_argument("--profiles", type=int, default=3, help="latency profiles per process")
    parser.add_argument("--profile-seconds", type=float, default=12.0)
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # one process's work
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/allocator.json")
    parser.add_argument("--update-docs", action="store_true")
    return parser.parse_args(argv)


def one_process(args: argparse.Namespace) -> dict:
    """One arm's measurements in this process (``--arm``)."""
    import torch

    from flexens import latency
    from flexens.allocator import retain_freed_memory
    from flexens.halting import get_criterion
    from flexens.inference import load_calibrated_members

    if args.arm == "retained":
        if not retain_freed_memory():
            raise SystemExit("error: freed memory can be kept only with glibc's malloc (Linux)")
    else:  # the profile would keep freed memory itself: leave glibc's defaults in place
        latency.retain_freed_memory = lambda: False
    members, calibration = load_calibrated_members(args.thresholds, args.members_dir)
    networks = [m.network for m in members]
    if not calibration.latency_profile:
        raise SystemExit(
            f"error: {args.thresholds} holds no latency profile to read the input shape from"
        )
    shape = calibration.latency_profile["input_shape"]
    x = torch.randn(args.batch_size, *shape).contiguous(memory_format=torch.channels_last)
    member = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            for _ in range(CALLS):
                networks[0](x)
            faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            for _ in range(CALLS):
                networks[0](x)
            seconds = (time.perf_counter() - start) / CALLS
            faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / CALLS
        member[str(threads)] = {"ms_per_call": seconds * 1e3, "faults_per_call": faults}
    profiles = []
    for _ in range(args.profiles):
        profile = latency.latency_profile(
            networks,
            [m.sha256 for m in members],
            x[:1],
            args.batch_size,
            torch.device("cpu"),
            get_criterion("margin"),
            members[0].num_classes,
            seconds=args.profile_seconds,
        )
        profiles.append(
            {
                "batch1_ms": float(np.mean([m["batch1_ms"] for m in profile["members"]])),
                "batched_ms_per_image": float(
                    np.mean([m["batched_ms_per_image"] for m in profile["members"]])
                ),
            }
        )
    return {"member": member, "profiles": profiles}


def run(args: argparse.Namespace) -> dict:
    from flexens.latency import machine_info

    runs = {arm: [] for arm in ARMS}
    for _ in range(args.pairs):
        for arm in ARMS:
            command = [
                *(sys.executable, __file__, "--arm", arm),
                *("--members-dir", str(args.members_dir), "--thresholds", str(args.thresholds)),
                *("--batch-size", str(args.batch_size), "--profiles", str(args.profiles)),
                *("--profile-seconds", str(args.profile_seconds)),
            ]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise SystemExit(f"error: the {arm} process failed: {last.removeprefix('error: ')}")
            runs[arm].append(json.loads(done.stdout.splitlines()[-1]))
    return {
        "machine": machine_info(),
        "members": repo_path(args.members_dir),
        "batch_size": args.batch_size,
        "profile_seconds": args.profile_seconds,
        "runs": runs,
    }


def markdown(result: dict) -> str:
    m, b = result["machine"], result["batch_size"]
    lines = [
        f"Machine: {m['device']} ({m['cpu_count']} cores), torch {m['torch']}, Python "
        f"{m['python']}; {m['date']}. Command: `python benchmarks/allocator.py`. "
        f"Members `{result['members']}`; every process fresh, the two arms alternating.",
        "",
        f"| freed memory | process | member at batch {b}, 1 thread: ms per call (page faults) "
        f"| 2 threads | profiles one after another: batch {b}, ms per image | batch 1, ms |",
        "|---|---:|---:|---:|---|---|",
    ]
    for arm in ARMS:
        for i, r in enumerate(result["runs"][arm], 1):
            one, two = r["member"]["1"], r["member"]["2"]
            batched = ", ".join(f"{p['batched_ms_per_image']:.4f}" for p in r["profiles"])
            single = ", ".join(f"{p['batch1_ms']:.3f}" for p in r["profiles"])
            name = "handed back (glibc's default)" if arm == "default" else "kept (flexens)"
            lines.append(
                f"| {name} | {i} | {one['ms_per_call']:.2f} ({one['faults_per_call']:.0f}) "
                f"| {two['ms_per_call']:.2f} ({two['faults_per_call']:.0f}) | {batched} "
                f"| {single} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with one_line_errors():
        if args.arm:
            print(json.dumps(one_process(args)))
            return
        result = run(args)
    write_json(args.out, result)
    section = markdown(result)
    publish(section, "allocator", args.update_docs)


if __name__ == "__main__":
    main()
