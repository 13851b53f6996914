"""What a λ sweep costs beyond Hydra start-up: ``calibrate.py -m calibrate.lam=...``.

    python benchmarks/lambda_sweep.py [--experiment cifar10] [--logger csv]

Times one single-λ run and one 6-λ multirun of the real entry point (logits and latency
profile already cached by an earlier calibration), and reports the marginal seconds per
extra λ: ``(t_sweep − t_single) / 5``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from flexens.artifacts import write_json
from flexens.latency import machine_info

ROOT = Path(__file__).resolve().parents[1]
LAMBDAS = "0,0.1,0.3,1,3,10"


def timed_run(*overrides: str) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, str(ROOT / "calibrate.py"), *overrides],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="cifar10")
    parser.add_argument("--logger", default="csv", help="csv or wandb (offline)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs/benchmarks/lambda_sweep.json")
    args = parser.parse_args()
    base = [f"experiment={args.experiment}", f"logger={args.logger}"]
    scratch = f"calibrate.output={args.out.with_suffix('.thresholds.json')}"
    timed_run(*base, scratch)  # fills the logit cache and latency profile; not timed
    single = timed_run(*base, "calibrate.lam=10", scratch)
    sweep = timed_run("-m", *base, f"calibrate.lam={LAMBDAS}")
    count = len(LAMBDAS.split(","))
    result = {
        "machine": machine_info(),
        "logger": args.logger,
        "single_s": single,
        "sweep_s": sweep,
        "lambdas": count,
        "marginal_s_per_lambda": (sweep - single) / (count - 1),
    }
    write_json(args.out, result)
    print(
        f"single run {single:.1f} s, {count}-λ sweep {sweep:.1f} s: "
        f"{result['marginal_s_per_lambda']:.2f} s per extra λ ({args.logger} logger)"
    )


if __name__ == "__main__":
    main()
