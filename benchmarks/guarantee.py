"""Do the thresholds keep their promise on new data? Violation rates over random splits.

    python benchmarks/guarantee.py           # the CIFAR-10 benchmark ensemble (5 members)
    python benchmarks/guarantee.py --quick   # digits, 3 tiny members, a temporary folder

Members come from ``train.py -m experiment=cifar10 seed=0..4`` (trained here if missing,
skipped if finished). Their outputs on two splits no member trained on are pooled: the
held-out calibration split (5,000 images) and the test split (10,000 images), 15,000
images in all. Each repeat shuffles the pool with its own seed: the first
``--calibration`` images (5,000) calibrate, all the others (10,000) evaluate. For every
procedure and ε it records the evaluation images' accuracy loss against the full
ensemble (top-1 of full minus top-1 of flexible, both on the evaluation images) and the
average members used there. A *violation* is an evaluation loss above ε.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("FLEXENS_ROOT", str(ROOT))

from flexens.artifacts import replace_marked_section, write_json  # noqa: E402
from flexens.calibration.cache import split_probs  # noqa: E402
from flexens.calibration.objectives import Objective  # noqa: E402
from flexens.calibration.risk import certified_front, certify, pick_certified, subset  # noqa: E402
from flexens.calibration.search import ThresholdSearch, make_grid  # noqa: E402
from flexens.calibration.simulate import StageTable  # noqa: E402
from flexens.halting import get_criterion  # noqa: E402
from flexens.latency import machine_info, resolve_device, timed  # noqa: E402
from flexens.members.registry import load_ensemble  # noqa: E402

EPSILONS = (0.0025, 0.005, 0.01, 0.02)
DELTA = 0.1
PROCEDURES = {
    "empirical per-stage search (uncertified)": ("empirical", "drop"),
    "shared threshold, fixed-sequence": ("shared", "drop"),
    "Pareto testing, per-stage": ("pareto", "drop"),
    "net drop, shared threshold": ("shared", "net_drop"),
    "net drop, Pareto testing": ("pareto", "net_drop"),
    "disagreement (label-free), Pareto testing": ("pareto", "disagreement"),
}


def pooled_table(args) -> tuple[StageTable, dict]:
    """Stage table of the pooled calibration + test images, one unit of cost per member."""
    overrides = [f"experiment={args.experiment}", "~logger"]
    if args.quick:
        overrides = ["data=digits", "model.kwargs.width=8", "~logger"]
    if args.output_dir:
        overrides.append(f"paths.output_dir={args.output_dir}")
    train = [sys.executable, str(ROOT / "train.py"), "-m", f"seed={args.seeds}", *overrides]
    train += ["logger=csv", "train.progress_bar=false", *args.train_overrides]
    subprocess.run(train, cwd=ROOT, check=True)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("calibrate", overrides=overrides)
    members = load_ensemble(cfg.paths.members_dir)
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    device = resolve_device("cpu")
    parts = [
        split_probs(members, datamodule, s, device, cfg.paths.cache_dir) for s in ("calib", "test")
    ]
    probs = torch.cat([p for p, _ in parts], dim=1)
    labels = torch.cat([y for _, y in parts])
    costs = np.ones(len(members))
    table = StageTable.from_probs(probs, labels, get_criterion(args.criterion), costs)
    pool = {"calibration_split": len(parts[0][1]), "test_split": len(parts[1][1])}
    return table, {"members": [m.path.name for m in members], **pool}


def empirical(table: StageTable, grid: np.ndarray, epsilon: float) -> np.ndarray:
    """Today's uncertified choice: least latency whose calibration loss is ≤ ε."""
    full = table.full()
    objective = Objective(
        "max_drop", full.latency_ms, full.error, table.num_samples, max_drop=epsilon
    )
    return ThresholdSearch(table, grid, objective).per_stage(20000, 4).thresholds


def choose(cal: StageTable, procedure: str, risk: str, grid: np.ndarray, seed: int) -> list:
    """One procedure's thresholds at every ε on one calibration split."""
    if procedure == "empirical":
        return [empirical(cal, grid, eps) for eps in EPSILONS]
    path = certify(cal, risk, procedure, DELTA, grid, split_seed=seed)
    front = certified_front(path, cal)
    return [pick_certified(front, eps)["thresholds"] for eps in EPSILONS]


def one_split(table: StageTable, seed: int, args, grid: np.ndarray) -> dict:
    """Every procedure at every ε on one random calibration / evaluation split."""
    order = np.random.default_rng(seed).permutation(table.num_samples)
    cal, ev = subset(table, order[: args.calibration]), subset(table, order[args.calibration :])
    full_acc = ev.full().accuracy
    out = {}
    for name, (procedure, risk) in PROCEDURES.items():
        seconds, chosen = timed(
            lambda procedure=procedure, risk=risk: choose(cal, procedure, risk, grid, seed)
        )
        outcomes = [ev.evaluate(t) for t in chosen]
        out[name] = {
            "loss": [full_acc - o.accuracy for o in outcomes],
            "members": [o.avg_members for o in outcomes],
            "seconds": seconds,
        }
    return out


def summarise(splits: list[dict], num_members: int) -> dict:
    table = {}
    for name in PROCEDURES:
        loss = np.array([s[name]["loss"] for s in splits])  # (repeats, ε)
        members = np.array([s[name]["members"] for s in splits])
        table[name] = [
            {
                "epsilon": eps,
                "violation_rate": float((loss[:, j] > eps + 1e-12).mean()),
                "mean_loss": float(loss[:, j].mean()),
                "worst_loss": float(loss[:, j].max()),
                "avg_members": float(members[:, j].mean()),
                "implied_speedup": float(num_members / members[:, j].mean()),
            }
            for j, eps in enumerate(EPSILONS)
        ]
        table[name + " seconds"] = float(np.mean([s[name]["seconds"] for s in splits]))
    return table


def plot(summary: dict, path: Path) -> None:
    fig, (ax_v, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    eps_pp = [e * 100 for e in EPSILONS]
    for name in PROCEDURES:
        rows = summary[name]
        ax_v.plot(eps_pp, [r["violation_rate"] for r in rows], "o-", label=name)
        ax_m.plot(eps_pp, [r["avg_members"] for r in rows], "o-", label=name)
    ax_v.axhline(DELTA, color="k", ls="--", lw=1, label=f"δ = {DELTA}")
    for ax in (ax_v, ax_m):
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(eps_pp, [f"{e:g}" for e in eps_pp])
        ax.set_xlabel("promised accuracy loss ε (pp)")
        ax.grid(alpha=0.3)
    ax_v.set_ylabel("violation rate (evaluation loss > ε)")
    ax_m.set_ylabel("average members on evaluation images")
    ax_v.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def markdown(result: dict, command: str) -> str:
    m, s, pool = result["machine"], result["summary"], result["pool"]
    repeats = result["repeats"]
    noise = DELTA + 2 * np.sqrt(DELTA * (1 - DELTA) / repeats)
    lines = [
        f"Machine: {m['device']}, {m['cpu_count']} cores, torch {m['torch']}; {m['date']}. "
        f"Command: `{command}` ({result['seconds'] / 60:.1f} min).",
        "",
        f"Pool: {pool['calibration_split']:,} calibration-split + {pool['test_split']:,} test "
        f"images, outputs of members {', '.join(pool['members'])}. {repeats} random splits: "
        f"{result['calibration']:,} images calibrate, the other "
        f"{pool['calibration_split'] + pool['test_split'] - result['calibration']:,} evaluate. "
        f"δ = {DELTA}; full ensemble {result['full_accuracy'] * 100:.2f} % top-1 on the pool, "
        f"oracle {result['oracle_members']:.2f} members. With {repeats} repeats a procedure "
        f"whose true violation probability is δ shows a rate above {noise:.3f} only 2.5 % of "
        "the time (two binomial standard errors).",
        "",
        "| procedure | ε (pp) | violation rate | mean loss (pp) | worst loss (pp) | avg members "
        "| implied speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in PROCEDURES:
        for r in s[name]:
            lines.append(
                f"| {name} | {r['epsilon'] * 100:g} | {r['violation_rate']:.3f} | "
                f"{r['mean_loss'] * 100:+.2f} | {r['worst_loss'] * 100:+.2f} | "
                f"{r['avg_members']:.2f} | {r['implied_speedup']:.2f}× |"
            )
    lines += [
        "",
        "Mean seconds per split (all ε): "
        + ", ".join(f"{name}: {s[name + ' seconds']:.2f} s" for name in PROCEDURES)
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", default="cifar10")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--output-dir", default=None, help="paths.output_dir (default: outputs/)")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument(
        "--calibration", type=int, default=5000, help="calibration images per split"
    )
    parser.add_argument("--criterion", default="margin")
    parser.add_argument("--jobs", type=int, default=1, help="processes for the splits")
    parser.add_argument("--grid-step", type=float, default=0.01)
    parser.add_argument("--quick", action="store_true", help="digits, 3 tiny members, temp folder")
    parser.add_argument("train_overrides", nargs="*", help="extra train.py overrides")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.calibration = "0,1,2", 300
        args.output_dir = args.output_dir or tempfile.mkdtemp(prefix="flexens-guarantee-")
        if args.results == parser.get_default("results"):
            args.results = str(Path(args.output_dir) / "results")
        args.train_overrides = ["trainer.max_epochs=2", *args.train_overrides]
    start = time.perf_counter()
    table, pool = pooled_table(args)
    if not 0 < args.calibration < table.num_samples:
        raise SystemExit(f"--calibration must be below the pool's {table.num_samples} images")
    grid = make_grid(args.grid_step)
    work = [(table, seed, args, grid) for seed in range(args.repeats)]
    if args.jobs > 1:  # independent splits; spawn, since fork after torch threads can hang
        with multiprocessing.get_context("spawn").Pool(args.jobs) as workers:
            splits = workers.starmap(one_split, work)
    else:
        splits = [one_split(*w) for w in work]
    results = Path(args.results)
    result = {
        "machine": machine_info(),
        "pool": pool,
        "repeats": args.repeats,
        "calibration": args.calibration,
        "delta": DELTA,
        "criterion": args.criterion,
        "full_accuracy": table.full().accuracy,
        "oracle_members": table.oracle().avg_members,
        "summary": summarise(splits, table.num_members),
        "plot": str(results / "guarantee.png"),
    }
    result["seconds"] = time.perf_counter() - start
    plot(result["summary"], results / "guarantee.png")
    write_json(results / "guarantee.json", result)
    command = "python benchmarks/guarantee.py" + (" --quick" if args.quick else "")
    section = markdown(result, command)
    if not args.quick:
        replace_marked_section(ROOT / "BENCHMARKS.md", "guarantee", section)
    print(section)
    print(f"results: {results / 'guarantee.json'}")


if __name__ == "__main__":
    main()
