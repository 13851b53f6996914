"""How fast is the per-stage threshold search on a calibration-sized problem?

Acceptance: ``ThresholdSearch.per_stage`` on 10,000 cached samples × 8 members with a
101-point grid (step 0.01) takes at most 2 s on a 2-core CPU. With 8 members the exhaustive
search is out of reach, so ``per_stage`` runs coordinate descent from several starts.

The cached member outputs are synthetic but shaped like real ones: every member sees the
same per-sample difficulty (a shared class-logit offset and a shared signal strength) plus
its own noise, so members are correlated, each is right ~77 % of the time and averaging
them still helps. Run: ``python benchmarks/search_speed.py [--members 8 --samples 10000]``.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from flexens.artifacts import write_json
from flexens.calibration.objectives import Objective
from flexens.calibration.search import SearchResult, ThresholdSearch, make_grid
from flexens.calibration.simulate import StageTable
from flexens.halting import get_criterion
from flexens.latency import machine_info, timed

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 2.0
"""The acceptance bound for ``per_stage`` at the default sizes."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--step", type=float, default=0.01, help="threshold grid step")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    parser.add_argument("--lam", type=float, default=10.0, help="λ of the lambda objective")
    parser.add_argument("--restarts", type=int, default=4, help="random descent starts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs/benchmarks/search_speed.json")
    return parser.parse_args(argv)


def synthetic_member_probs(
    members: int, samples: int, classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax outputs ``(N, S, C)`` and labels of correlated members of realistic accuracy.

    Shared per-sample terms (how strongly the true class stands out, and which wrong
    classes look plausible) make members err on the same hard samples, as trained members
    do; the independent noise is what averaging removes.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (samples,), generator=g)
    strength = 4.0 * (1.0 + 0.5 * torch.randn(samples, 1, generator=g))
    confusion = torch.randn(samples, classes, generator=g)
    signal = torch.nn.functional.one_hot(labels, classes).float() * strength
    noise = torch.randn(members, samples, classes, generator=g)
    return (signal + confusion + noise).softmax(dim=-1), labels


def stage_costs_ms(members: int) -> np.ndarray:
    """Batch-1 costs of members that differ a little, as mixed architectures would."""
    return np.linspace(1.0, 1.5, members)


def median_time(fn: Callable[[], object], repeats: int) -> tuple[float, list[float], object]:
    """Median seconds of ``repeats`` calls (the odd run slowed by other load on the machine
    does not move it), the individual times, and the last call's result."""
    runs = [timed(fn) for _ in range(repeats)]
    times = [seconds for seconds, _ in runs]
    return statistics.median(times), times, runs[-1][1]


def summarise(table: StageTable, result: SearchResult, seconds: float, times: list[float]) -> dict:
    """A search's speed and what its thresholds do on the calibration samples."""
    outcome = table.evaluate(result.thresholds)
    return {
        "median_s": seconds,
        "times_s": times,
        "method": result.method,
        "evaluations": result.evaluations,
        "thresholds": result.thresholds.tolist(),
        "score": result.score,
        "accuracy": outcome.accuracy,
        "avg_members": outcome.avg_members,
        "latency_ms": outcome.latency_ms,
    }


def run(args: argparse.Namespace) -> dict:
    """Build the table and time construction, the shared search and the per-stage search."""
    probs, labels = synthetic_member_probs(args.members, args.samples, args.classes, args.seed)
    criterion, costs = get_criterion("margin"), stage_costs_ms(args.members)
    build_s, build_times, table = median_time(
        lambda: StageTable.from_probs(probs, labels, criterion, costs), args.repeats
    )
    full, grid = table.full(), make_grid(args.step)
    objective = Objective("lambda", full.latency_ms, full.error, table.num_samples, lam=args.lam)
    shared_s, shared_times, shared = median_time(
        lambda: ThresholdSearch(table, grid, objective).shared(), args.repeats
    )
    per_stage_s, per_stage_times, per_stage = median_time(
        lambda: ThresholdSearch(table, grid, objective).per_stage(
            max_exhaustive_evals=20_000, restarts=args.restarts, seed=args.seed
        ),
        args.repeats,
    )
    member_acc = (probs.argmax(-1) == labels).float().mean(dim=1)
    return {
        "benchmark": "search_speed",
        "machine": machine_info(),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data": {
            "member_accuracy_mean": float(member_acc.mean()),
            "full_accuracy": full.accuracy,
            "first_member_accuracy": table.prefix(1).accuracy,
            "grid_points": len(grid),
            "stage_cost_ms": costs.tolist(),
        },
        "table_build": {"median_s": build_s, "times_s": build_times},
        "shared": summarise(table, shared, shared_s, shared_times),
        "per_stage": summarise(table, per_stage, per_stage_s, per_stage_times),
        "target": {"per_stage_max_s": TARGET_S, "passed": per_stage_s <= TARGET_S},
    }


def report(result: dict) -> None:
    """The table a reader checks: timings, search effort, and the acceptance verdict."""
    cfg, data = result["config"], result["data"]
    print(
        f"machine: {result['machine']['device']}, {result['machine']['cpu_count']} CPUs, "
        f"torch {result['machine']['torch']}"
    )
    print(
        f"{cfg['samples']} samples × {cfg['members']} members × {data['grid_points']}-point "
        f"grid; member acc {data['member_accuracy_mean']:.1%}, "
        f"ensemble acc {data['full_accuracy']:.1%}"
    )
    print(f"{'step':<12}{'median s':>10}{'method':>20}{'evals':>9}{'acc':>8}{'members':>9}")
    print(f"{'StageTable':<12}{result['table_build']['median_s']:>10.3f}")
    for name in ("shared", "per_stage"):
        r = result[name]
        print(
            f"{name:<12}{r['median_s']:>10.3f}{r['method']:>20}{r['evaluations']:>9}"
            f"{r['accuracy']:>8.1%}{r['avg_members']:>9.2f}"
        )
    verdict = "PASS" if result["target"]["passed"] else "FAIL"
    print(
        f"{verdict}: per-stage search {result['per_stage']['median_s']:.3f} s "
        f"(target ≤ {TARGET_S:g} s)"
    )


def main() -> None:
    args = parse_args()
    result = run(args)
    report(result)
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
