"""Loggers never hold a run hostage, and every run ends with its job's state.

The W&B states are read from the offline run files themselves (``run-<id>.wandb``, see
``conftest.wandb_offline_runs``): exit code 0 for a job that succeeded, non-zero for one
that failed, none for a run never finished.
"""

import json
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import ROOT, run_script, wandb_offline_runs
from flexens.memo import SweepMemo
from flexens.tasks.calibrate import calibrate
from flexens.tasks.infer import infer
from flexens.tasks.train import train_member

TINY = [
    "model.kwargs.width=8",
    "trainer.max_epochs=1",
    "train.progress_bar=false",
    "data.batch_size=16",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
]
QUICK_INFER = ["infer.latency_images=5", "infer.throughput_images=64", "infer.warmup=1"]


def config(task: str, run: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        device = [] if task == "train" else ["device=cpu"]
        return compose(task, overrides=[f"paths.run_dir={run}", *device, *overrides])


def exit_codes(run: Path) -> list:
    return [r["exit_code"] for r in wandb_offline_runs(run)]


@pytest.mark.usefixtures("one_thread")
def test_online_wandb_without_network_falls_back_to_offline(
    digits_ensemble, tmp_path, capsys, monkeypatch
):
    """In-process, so the 30 s bound times the run and not the interpreter's start."""
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("WANDB_MODE")  # the tests' default; without the fallback: online
    cfg = config(
        "calibrate",
        tmp_path / "run",
        f"paths.output_dir={digits_ensemble}",
        "logger.offline=false",
        f"calibrate.output={tmp_path}/online.json",
    )
    start = time.perf_counter()
    calibrate(cfg, SweepMemo())
    assert time.perf_counter() - start <= 30
    out = capsys.readouterr().out
    assert "is not reachable" in out and "logging offline instead" in out
    assert json.loads((tmp_path / "online.json").read_text())["certificate"]
    assert exit_codes(tmp_path / "run") == [0]


@pytest.mark.usefixtures("one_thread")
def test_a_train_job_leaves_its_wandb_run_marked_with_its_outcome(tmp_path: Path) -> None:
    out = f"paths.output_dir={tmp_path}"
    with pytest.raises(ValueError, match="NaN/Inf"):
        train_member(config("train", tmp_path / "failed", out, *TINY, "train.optimizer.lr=1e30"))
    train_member(config("train", tmp_path / "succeeded", out, *TINY))
    assert exit_codes(tmp_path / "failed") == [1]
    assert exit_codes(tmp_path / "succeeded") == [0]


@pytest.mark.usefixtures("one_thread")
def test_calibrate_and_infer_jobs_leave_their_wandb_runs_marked(digits_ensemble, tmp_path):
    """A job that fails after its run started (here: its output path is a folder)."""
    out = f"paths.output_dir={digits_ensemble}"
    published = f"calibrate.output={tmp_path}/thresholds.json"
    (tmp_path / "cal_failed" / "thresholds.json").mkdir(parents=True)
    with pytest.raises(IsADirectoryError):
        calibrate(config("calibrate", tmp_path / "cal_failed", out, published), SweepMemo())
    calibrate(config("calibrate", tmp_path / "cal_ok", out, published), SweepMemo())
    thresholds = f"infer.thresholds={tmp_path}/thresholds.json"
    (tmp_path / "inf_failed" / "predictions.csv").mkdir(parents=True)
    with pytest.raises(IsADirectoryError):
        infer(config("infer", tmp_path / "inf_failed", out, thresholds, *QUICK_INFER))
    infer(config("infer", tmp_path / "inf_ok", out, thresholds, *QUICK_INFER))
    for job, code in (("cal_failed", 1), ("cal_ok", 0), ("inf_failed", 1), ("inf_ok", 0)):
        assert exit_codes(tmp_path / job) == [code], job


@pytest.mark.slow
def test_in_a_sweep_no_job_logs_into_another_jobs_run(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_script(
        "train.py",
        "-m",
        f"paths.output_dir={tmp_path}",
        f"hydra.sweep.dir={sweep}",
        *TINY,
        "train.optimizer.lr=1e30,0.05",  # job 0 diverges after its run started
        check=False,
    )
    assert result.returncode == 2, result.stderr
    for job, lr, code in (("0", 1e30, 1), ("1", 0.05, 0)):
        (run,) = wandb_offline_runs(sweep / job)
        assert run["exit_code"] == code
        assert run["config"]["train"]["optimizer"]["lr"] == lr
    ids = [r["id"] for r in wandb_offline_runs(sweep)]
    assert len(ids) == len(set(ids)) == 2
