"""What a λ sweep costs beyond Hydra start-up: ``calibrate.py -m calibrate.lam=...``.

    python benchmarks/lambda_sweep.py [--experiment cifar10|none] [--loggers csv,wandb]

Times single-λ runs and 6-λ multiruns of the real entry point (logits and latency profile
already cached by an untimed first calibration), alternating the two so the machine's
drift hits both alike, and reports the marginal seconds per extra λ:
``(median t_sweep − median t_single) / 5``. It also reads the start time of every job
from Hydra's log, so the cost of one job inside the sweep is there too.
Target: at most 1 s per extra λ.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from flexens.artifacts import write_json
from flexens.latency import machine_info, timed

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 1.0
_JOB_START = re.compile(r"^\[([\d-]+ [\d:,]+)\]\[HYDRA\]\s+#\d+ :", re.MULTILINE)


def timed_run(*overrides: str) -> tuple[float, str]:
    seconds, result = timed(
        lambda: subprocess.run(
            [sys.executable, str(ROOT / "calibrate.py"), *overrides],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    )
    if result.returncode != 0:
        sys.exit(f"calibrate.py {' '.join(overrides)} failed:\n{result.stderr[-3000:]}")
    return seconds, result.stdout + result.stderr


def job_intervals(log: str) -> list[float]:
    """Seconds between consecutive job starts in a multirun's Hydra log."""
    starts = [datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f") for t in _JOB_START.findall(log)]
    return [(b - a).total_seconds() for a, b in zip(starts, starts[1:], strict=False)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="cifar10", help="none: the default (digits)")
    parser.add_argument("--loggers", default="csv,wandb", help="comma-separated: csv, wandb")
    parser.add_argument("--lambdas", default="0,0.1,0.3,1,3,10")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output-dir", type=Path, help="paths.output_dir (default: outputs/)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs/benchmarks/lambda_sweep.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    count = len(args.lambdas.split(","))
    if count < 2:
        sys.exit(f"--lambdas {args.lambdas!r}: a sweep needs at least two values, e.g. 0,10")
    base = [] if args.experiment == "none" else [f"experiment={args.experiment}"]
    base.append("calibrate.objective=lambda")
    if args.output_dir:
        base.append(f"paths.output_dir={args.output_dir}")
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        single_overrides = [
            *base,
            f"calibrate.output={scratch}/thresholds.json",  # leave the published file alone
            f"hydra.run.dir={scratch}/single",
        ]
        timed_run(*single_overrides, "logger=csv")  # fills the logit cache and the profile
        for logger in args.loggers.split(","):
            singles, sweeps, intervals = [], [], []
            for r in range(args.repeats):
                singles.append(
                    timed_run(*single_overrides, f"logger={logger}", "calibrate.lam=10")[0]
                )
                seconds, log = timed_run(
                    "-m",
                    *base,
                    f"logger={logger}",
                    f"calibrate.lam={args.lambdas}",
                    f"hydra.sweep.dir={scratch}/sweep-{logger}-{r}",
                )
                sweeps.append(seconds)
                intervals += job_intervals(log)
            single, sweep = statistics.median(singles), statistics.median(sweeps)
            marginal = (sweep - single) / (count - 1)
            results[logger] = {
                "single_s": singles,
                "sweep_s": sweeps,
                "median_single_s": single,
                "median_sweep_s": sweep,
                "marginal_s_per_lambda": marginal,
                "median_job_interval_s": statistics.median(intervals) if intervals else None,
                "passed": marginal <= TARGET_S,
            }
    report = {
        "machine": machine_info(),
        "experiment": args.experiment,
        "lambdas": count,
        "repeats": args.repeats,
        "target_s_per_lambda": TARGET_S,
        "loggers": results,
    }
    write_json(args.out, report)
    for logger, r in results.items():
        per_job = r["median_job_interval_s"]
        print(
            f"{logger}: single run {r['median_single_s']:.1f} s, {count}-λ sweep "
            f"{r['median_sweep_s']:.1f} s (medians of {args.repeats}): "
            f"{r['marginal_s_per_lambda']:.2f} s per extra λ, one job inside the sweep "
            f"{'n/a' if per_job is None else f'{per_job:.2f} s'} — "
            f"{'PASS' if r['passed'] else 'FAIL'} "
            f"(target ≤ {TARGET_S:g} s)"
        )


if __name__ == "__main__":
    main()
