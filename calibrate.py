"""Calibrate halting thresholds on the held-out split: ``python calibrate.py calibrate.max_drop=0.01``."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("FLEXENS_ROOT", str(Path(__file__).resolve().parent))

from flexens.memo import SweepMemo  # noqa: E402

SWEEP_MEMO = SweepMemo()
"""What the jobs of a sweep run in this process share (inputs, λ curve, plots)."""


@hydra.main(version_base="1.3", config_path="conf", config_name="calibrate")
def main(cfg: DictConfig) -> None:
    from flexens.cli import run

    run("calibrate", cfg, SWEEP_MEMO)


if __name__ == "__main__":
    main()
