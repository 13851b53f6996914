"""Kill -9 at every stage, then rerun: the end state equals an uninterrupted run's.

Kills hit real processes at real moments: when a file they write appears on disk, or, for
moments too short to poll (the rename that publishes a file), by running the entry point
under a wrapper that sends itself SIGKILL just before that rename. Each test checks that
nothing half-written was published, that the rerun ends where an uninterrupted run ends
(members weight for weight, thresholds.json field for field, metrics in accuracy), and that
no temporary file or empty ``.work/`` folder is left behind. The crafted-pickle checkpoint
is covered in test_member_files.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from conftest import ROOT, run_script
from flexens.artifacts import _host, remove_stray_temp_files, write_json, write_text
from flexens.data.base import EpochShuffle
from flexens.members.registry import load_member, member_path, record_path
from flexens.tasks.train import EpochSeeds, train_member

MEMBERS = "members/digits-small_cnn"
TRAIN = [
    "data=digits",
    "model.kwargs.width=8",
    "train.progress_bar=false",
    "logger=csv",
    "data.batch_size=16",
    "+trainer.limit_train_batches=3",
    "+trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
]
EPOCHS = 3

pytestmark = [
    pytest.mark.filterwarnings(r"ignore:Checkpoint directory .* exists and is not empty"),
    pytest.mark.usefixtures("one_thread"),  # child processes inherit OMP_NUM_THREADS=1
]

KILL_BEFORE_RENAME = """
import os, runpy, signal, sys
target, script = sys.argv[1], sys.argv[2]
rename = os.replace
def replace(src, dst, *args, **kwargs):
    if str(dst).endswith(target):
        os.kill(os.getpid(), signal.SIGKILL)
    return rename(src, dst, *args, **kwargs)
os.replace = replace
sys.argv = sys.argv[2:]
runpy.run_path(script, run_name="__main__")
"""
"""Runs an entry point that dies by SIGKILL just before it renames a temporary file onto a
path ending in ``target``: the moment a published file would appear."""


# -- helpers --------------------------------------------------------------------------------
def train_overrides(out: Path, epochs: int = EPOCHS) -> list[str]:
    """A tiny digits member in ``out``, as train.py takes it."""
    return [
        *TRAIN,
        f"trainer.max_epochs={epochs}",
        f"paths.output_dir={out}",
        f"paths.run_dir={out}/run",
    ]


def train_config(out: Path, epochs: int = EPOCHS) -> DictConfig:
    """The same, for an in-process run."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=train_overrides(out, epochs))


def _env() -> dict:
    return {**os.environ, "FLEXENS_ROOT": str(ROOT), "HYDRA_FULL_ERROR": "0"}


def kill_before_rename(target: str, script: str, *overrides: str) -> None:
    """Run ``script`` until it is about to publish ``target``; it must die right there."""
    command = [sys.executable, "-c", KILL_BEFORE_RENAME, target, str(ROOT / script), *overrides]
    result = subprocess.run(
        command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == -signal.SIGKILL, (
        f"{script} was not killed before renaming onto {target}:\n{result.stdout}\n{result.stderr}"
    )


def kill_when(ready: Callable[[], bool], script: str, *overrides: str, log: Path) -> None:
    """Run ``script`` and SIGKILL it as soon as ``ready()`` holds (polled every 5 ms)."""
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / script), *overrides],
            cwd=ROOT,
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 600
            while process.poll() is None and time.monotonic() < deadline:
                if ready():
                    process.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.005)
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == -signal.SIGKILL, f"{script} ended first:\n{log.read_text()}"


def loadable_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a whole Lightning checkpoint, safe to kill the run after."""
    try:
        return "state_dict" in torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # absent, or not yet whole
        return False


def leftovers(root: Path) -> list[Path]:
    """Temporary files of killed writers and empty ``.work/`` folders anywhere under root."""
    temps = list(root.rglob(".*.tmp"))
    empty = [p for p in root.rglob(".work") if p.is_dir() and not any(p.iterdir())]
    return temps + empty


def assert_same_member(got: Path, want: Path) -> None:
    """Bit-identical weights, and the same record but for the training time."""
    a, b = load_member(got), load_member(want)
    state_a, state_b = a.network.state_dict(), b.network.state_dict()
    assert state_a.keys() == state_b.keys()
    differing = [k for k in state_a if not torch.equal(state_a[k], state_b[k])]
    assert not differing, f"{len(differing)} tensors differ, first {differing[0]}"
    assert a.sha256 == b.sha256
    timeless = [{k: v for k, v in m.meta.items() if k != "train_time_s"} for m in (a, b)]
    assert timeless[0] == timeless[1]


# -- artifacts: permissions and what killed writers leave -------------------------------------
def test_published_files_get_the_permissions_of_any_new_file(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        made = [write_json(tmp_path / "a.json", {"a": 1}), write_text(tmp_path / "b.txt", "b")]
    finally:
        os.umask(old)
    for path in made:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, oct(path.stat().st_mode)


def test_stray_temp_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])  # a pid whose process has exited
    dead.wait()
    host = _host()
    killed = tmp_path / f".seed=0.json.{host}-{dead.pid}.0123abcd.tmp"
    live = tmp_path / f".seed=1.json.{host}-{os.getpid()}.0123abcd.tmp"
    elsewhere = tmp_path / f".seed=2.json.otherhost-{dead.pid}.0123abcd.tmp"
    legacy_old, legacy_new = tmp_path / ".x.json.k2j3h4_q.tmp", tmp_path / ".y.json.k2j3h4_q.tmp"
    foreign = tmp_path / ".someone_elses.tmp"  # not a name flexens writes: never touched
    for path in (killed, live, elsewhere, legacy_old, legacy_new, foreign):
        path.write_text("half")
    for path in (legacy_old, foreign):
        os.utime(path, (time.time() - 7200, time.time() - 7200))

    write_json(tmp_path / "thresholds.json", {})  # any write into the folder cleans it
    assert not killed.exists() and not legacy_old.exists()
    assert live.exists() and elsewhere.exists() and legacy_new.exists() and foreign.exists()
    assert remove_stray_temp_files(tmp_path) == []


# -- resume restores the data order -----------------------------------------------------------
def test_the_shuffle_depends_on_seed_and_epoch_only() -> None:
    data = list(range(50))
    first = list(EpochShuffle(data, seed=0, epoch=3))
    again = EpochShuffle(data, seed=0)
    torch.manual_seed(123)  # the global RNG plays no part
    again.set_epoch(3)
    assert list(again) == first and sorted(first) == data
    assert list(EpochShuffle(data, seed=0, epoch=4)) != first
    assert list(EpochShuffle(data, seed=1, epoch=3)) != first


class Interrupted(Exception):
    """Stands in for the end of a process between two epochs (its checkpoint is on disk)."""


def test_an_interrupted_member_resumes_to_the_very_same_weights(
    tmp_path: Path, capsys, monkeypatch
):
    whole = train_member(train_config(tmp_path / "whole"))
    start = EpochSeeds.on_train_epoch_start

    def stop_at_last_epoch(self, trainer, module):
        if trainer.current_epoch == EPOCHS - 1:
            raise Interrupted
        start(self, trainer, module)

    cfg = train_config(tmp_path / "resumed")
    with monkeypatch.context() as patch:
        patch.setattr(EpochSeeds, "on_train_epoch_start", stop_at_last_epoch)
        with pytest.raises(Interrupted):
            train_member(cfg)
    members = tmp_path / "resumed" / MEMBERS
    assert loadable_checkpoint(members / ".work" / "seed=0" / "last.ckpt")
    assert not list(members.glob("seed=0.*"))
    capsys.readouterr()
    resumed = train_member(cfg)
    assert "resuming from" in capsys.readouterr().out
    assert_same_member(resumed, whole)
    assert leftovers(tmp_path) == [] and not (members / ".work").exists()


# -- SIGKILL of train.py ----------------------------------------------------------------------
def test_train_killed_while_publishing_a_member_ends_equal_after_a_rerun(tmp_path, capsys):
    """Killed between the weights and their record: unfinished, retrained to the same bits."""
    reference = train_member(train_config(tmp_path / "whole"))
    out = tmp_path / "killed"
    kill_before_rename(f"{MEMBERS}/seed=0.json", "train.py", *train_overrides(out))
    members = out / MEMBERS
    assert not record_path(member_path(members, 0)).exists()  # weights alone: not a member
    assert len(list(members.glob(".seed=0.json.*.tmp"))) == 1  # the killed writer's file
    with pytest.raises(FileNotFoundError, match="unfinished"):
        load_member(member_path(members, 0))
    capsys.readouterr()
    assert_same_member(train_member(train_config(out)), reference)
    assert "resuming from" in capsys.readouterr().out
    assert leftovers(out) == []


@pytest.mark.slow
def test_train_killed_after_an_epoch_resumes_to_the_same_member(tmp_path: Path) -> None:
    epochs = 6  # room to kill it in after the first checkpoint
    reference = train_member(train_config(tmp_path / "whole", epochs))
    out = tmp_path / "killed"
    last = out / MEMBERS / ".work" / "seed=0" / "last.ckpt"
    overrides = train_overrides(out, epochs)
    kill_when(lambda: loadable_checkpoint(last), "train.py", *overrides, log=tmp_path / "log")
    assert torch.load(last, weights_only=True)["epoch"] < epochs - 1  # killed mid-training
    assert not list((out / MEMBERS).glob("seed=0.*"))
    rerun = run_script("train.py", *overrides)
    assert "resuming from" in rerun.stdout
    assert_same_member(member_path(out / MEMBERS, 0), reference)
    assert leftovers(out) == []


@pytest.mark.slow
def test_train_killed_while_writing_the_weights_publishes_nothing(tmp_path: Path) -> None:
    reference = train_member(train_config(tmp_path / "whole"))
    out = tmp_path / "killed"
    kill_before_rename(f"{MEMBERS}/seed=0.safetensors", "train.py", *train_overrides(out))
    members = out / MEMBERS
    assert not list(members.glob("seed=0.*"))
    assert len(list(members.glob(".seed=0.safetensors.*.tmp"))) == 1
    run_script("train.py", *train_overrides(out))
    assert_same_member(member_path(members, 0), reference)
    assert leftovers(out) == []


# -- SIGKILL of calibrate.py and infer.py -----------------------------------------------------
@pytest.fixture
def calibration_outputs(digits_ensemble: Path, tmp_path: Path) -> tuple[Path, dict]:
    """A copy of the digits members, and the thresholds.json of an uninterrupted calibration
    (which also stores the latency profile that every later run reads)."""
    out = tmp_path / "outputs"
    only_members = shutil.ignore_patterns(".*", "thresholds.json", "latency_profile-*")
    shutil.copytree(digits_ensemble / MEMBERS, out / MEMBERS, ignore=only_members)
    run_script("calibrate.py", *calibrate_overrides(out))
    published = out / MEMBERS / "thresholds.json"
    reference = json.loads(published.read_text())
    published.unlink()
    shutil.rmtree(out / "cache")
    return out, reference


def run_overrides(out: Path, run: Path | None = None) -> list[str]:
    run = run or out / "run"
    return [f"paths.output_dir={out}", f"paths.run_dir={run}", "logger=csv", "device=cpu"]


def calibrate_overrides(out: Path, run: Path | None = None) -> list[str]:
    # The rerun must read the stored latency profile as the first run left it: a quick
    # check that finds it "stale" on a noisy machine would re-measure it.
    return [*run_overrides(out, run), "calibrate.profile_check=false"]


def infer_overrides(out: Path, run: Path | None = None) -> list[str]:
    quick = ["infer.latency_images=5", "infer.throughput_images=64", "infer.warmup=1"]
    return [*run_overrides(out, run), *quick]


def same_calibration(got: dict, want: dict) -> None:
    """Equal field for field but for two: where the latency profile came from (measured by
    the uninterrupted run, read back by the later ones) and how long the search took."""
    got, want = json.loads(json.dumps(got)), json.loads(json.dumps(want))
    for report in (got, want):
        report["latency_profile"].pop("source", None)
        report["search"].pop("seconds", None)
    assert got == want


@pytest.mark.slow
def test_calibrate_killed_after_caching_outputs_ends_equal(calibration_outputs, tmp_path):
    out, reference = calibration_outputs
    logits = out / "cache" / "logits"
    kill_when(
        lambda: logits.is_dir() and any(logits.glob("*.pt")),
        "calibrate.py",
        *calibrate_overrides(out),
        log=tmp_path / "log",
    )
    assert not (out / MEMBERS / "thresholds.json").exists()
    run_script("calibrate.py", *calibrate_overrides(out))
    same_calibration(json.loads((out / MEMBERS / "thresholds.json").read_text()), reference)
    assert leftovers(out) == []


@pytest.mark.slow
def test_calibrate_killed_while_publishing_thresholds_ends_equal(calibration_outputs):
    out, reference = calibration_outputs
    kill_before_rename(f"{MEMBERS}/thresholds.json", "calibrate.py", *calibrate_overrides(out))
    published = out / MEMBERS / "thresholds.json"
    assert not published.exists()
    assert len(list(published.parent.glob(".thresholds.json.*.tmp"))) == 1
    run_script("calibrate.py", *calibrate_overrides(out))
    same_calibration(json.loads(published.read_text()), reference)
    assert leftovers(out) == []


@pytest.mark.slow
def test_infer_killed_before_its_metrics_ends_equal(calibration_outputs, tmp_path):
    out, _ = calibration_outputs
    run_script("calibrate.py", *calibrate_overrides(out))
    run_script("infer.py", *infer_overrides(out, tmp_path / "whole"))
    kill_before_rename("run/metrics.json", "infer.py", *infer_overrides(out))
    assert not (out / "run" / "metrics.json").exists()
    run_script("infer.py", *infer_overrides(out))
    got = json.loads((out / "run" / "metrics.json").read_text())
    want = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    for mode in ("flexible", "full", "oracle"):
        assert got[mode]["accuracy"] == want[mode]["accuracy"]
        assert got[mode]["avg_members"] == want[mode]["avg_members"]
    assert leftovers(out) == []
