"""Shared fixtures: a tiny trained digits ensemble, made once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("FLEXENS_ROOT", str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def run_script(script: str, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run an entry point as a user would, from the project folder."""
    env = {**os.environ, "FLEXENS_ROOT": str(ROOT), "HYDRA_FULL_ERROR": "0"}
    result = subprocess.run(
        [sys.executable, str(ROOT / script), *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{script} {' '.join(overrides)} failed:\n{result.stdout}\n{result.stderr}"
        )
    return result


@pytest.fixture(scope="session")
def digits_ensemble(tmp_path_factory) -> Path:
    """Three small digits members trained by the real entry point; returns the output dir."""
    out = tmp_path_factory.mktemp("outputs")
    run_script(
        "train.py",
        "-m",
        "seed=0,1,2",
        f"paths.output_dir={out}",
        "logger=csv",
        "trainer.max_epochs=3",
        "train.progress_bar=false",
        "model.kwargs.width=8",
    )
    return out
