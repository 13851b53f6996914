"""Loggers never hold a run hostage: no network means offline logging, not a stall."""

import json
import time

from conftest import run_script


def test_online_wandb_without_network_falls_back_to_offline(digits_ensemble, tmp_path):
    start = time.perf_counter()
    result = run_script(
        "calibrate.py",
        f"paths.output_dir={digits_ensemble}",
        "logger.offline=false",
        f"calibrate.output={tmp_path}/online.json",
        f"paths.run_dir={tmp_path}/run",
        env={"WANDB_BASE_URL": "http://127.0.0.1:9"},  # nothing listens on the discard port
    )
    assert time.perf_counter() - start < 60
    assert "is not reachable" in result.stdout and "logging offline instead" in result.stdout
    assert json.loads((tmp_path / "online.json").read_text())["certificate"]
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
