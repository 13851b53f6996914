"""Member files nobody can booby-trap, and members that are whole or absent.

A member is ``seed=<n>.safetensors`` (tensors only) plus its record ``seed=<n>.json`` (arch,
metadata, the weights' sha256), written weights first and record last. Old pickled
``seed=<n>.ckpt`` members are never unpickled except by the converter behind ``--trust``.
Most tests build members in-process with ``save_member`` (no training); the ones that train
take two batches of the digits, in-process. Only the entry-point runs (subprocesses) are slow.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from conftest import ROOT, run_script
from flexens.artifacts import fingerprint
from flexens.calibration.schema import THRESHOLDS_FORMAT
from flexens.cli import run as cli_run
from flexens.inference import load_calibrated_members
from flexens.members.convert import main as convert_main
from flexens.members.networks import create_network
from flexens.members.registry import (
    load_ensemble,
    load_member,
    member_path,
    record_path,
    save_member,
)
from flexens.tasks.train import member_arch, train_member, training_recipe

MEMBERS = "members/digits-small_cnn"
TRAIN = ["data=digits", "model.kwargs.width=8", "trainer.max_epochs=1", "train.progress_bar=false"]
TINY = [
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "data.batch_size=16",
    "trainer.log_every_n_steps=1",
]
EVAL = ["data=digits", "model.kwargs.width=8", "device=cpu"]
FIXES = ("retrain", "train.py", "copy", "convert", "recalibrate", "train.force")

pytestmark = [
    pytest.mark.filterwarnings(r"ignore:Checkpoint directory .* exists and is not empty"),
    pytest.mark.usefixtures("one_thread"),  # conftest: one thread, no calibration left behind
]


# -- helpers --------------------------------------------------------------------------------
def config(task: str, out: Path, *overrides: str) -> DictConfig:
    base = TRAIN if task == "train" else EVAL
    paths = [f"paths.output_dir={out}", f"paths.run_dir={out}/run", "logger=csv"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(task, overrides=[*base, *paths, *overrides])


def make_member(out: Path, seed: int, *overrides: str) -> Path:
    """A member as train.py would publish it (random weights: no training needed)."""
    cfg = config("train", out, f"seed={seed}", *overrides)
    arch = member_arch(cfg, 10, 1)
    torch.manual_seed(seed)
    recipe = training_recipe(cfg)
    meta = {
        "seed": seed,
        "ensemble": "digits-small_cnn",
        "num_classes": 10,
        "class_names": [str(i) for i in range(10)],
        "calib_fingerprint": "calib",
        "val_acc": 0.5,
        "epochs": 0,
        "recipe": recipe,
        "recipe_fingerprint": fingerprint([recipe]),
    }
    path = member_path(out / MEMBERS, seed)
    return save_member(path, create_network(**arch), arch, meta)


class Booby:
    """Unpickling this object opens (creates) ``marker``: a stand-in for any payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_booby_trap(members_dir: Path, marker: Path, seed: int = 0) -> Path:
    members_dir.mkdir(parents=True, exist_ok=True)
    path = members_dir / f"seed={seed}.ckpt"
    torch.save({"format": "flexens-member-v1", "meta": Booby(marker)}, path)
    return path


def one_line_error(capsys: pytest.CaptureFixture, task: str, cfg: DictConfig) -> str:
    """What ``python <task>.py`` prints on a user error: one ``error:`` line, exit code 2."""
    with pytest.raises(SystemExit) as info:
        cli_run(task, cfg)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def rewrite_weights(path: Path, tensors: dict | bytes) -> None:
    """Replace the weights and re-sign the record, as a consistent forgery would."""
    data = tensors if isinstance(tensors, bytes) else save_safetensors(tensors)
    path.write_bytes(data)
    record = json.loads(record_path(path).read_text())
    record["sha256"] = hashlib.sha256(data).hexdigest()
    record_path(path).write_text(json.dumps(record))


def edit_record(path: Path, **changes) -> None:
    record = json.loads(record_path(path).read_text())
    record.update(changes)
    record_path(path).write_text(json.dumps(record))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def thresholds_naming(name: str, sha256: str) -> dict:
    """A well-formed one-member thresholds.json naming ``name`` (its schema is checked)."""
    return {
        "format": THRESHOLDS_FORMAT,
        "ensemble": "digits-small_cnn",
        "members": [{"path": name, "sha256": sha256}],
        "criterion": "margin",
        "thresholds": [],
        "calibration": {
            "num_samples": 10,
            "flexible": {"accuracy": 0.9, "avg_members": 1.0, "expected_latency_ms": 1.0},
            "full": {"accuracy": 0.9, "avg_members": 1.0, "expected_latency_ms": 1.0},
        },
        "latency_profile": {},
        "certificate": {},
        "certified_front": [],
        "pareto_front": [],
    }


# -- loading never runs code ----------------------------------------------------------------
def test_a_booby_trapped_checkpoint_never_runs(tmp_path: Path, capsys) -> None:
    """A pickle payload named seed=0.ckpt: calibrate and infer refuse it, unopened."""
    marker = tmp_path / "pwned"
    members_dir = tmp_path / MEMBERS
    trap = plant_booby_trap(members_dir, marker)
    elsewhere = plant_booby_trap(tmp_path / "elsewhere", marker, seed=1)

    for load in (
        lambda: load_ensemble(members_dir),
        lambda: load_ensemble(members_dir, [0]),
        lambda: load_ensemble(members_dir, [str(trap)]),
        lambda: load_member(trap),
        lambda: load_member(member_path(members_dir, 0)),
    ):
        with pytest.raises(ValueError) as info:
            load()
        message = str(info.value)
        assert "seed=0.ckpt" in message and "\n" not in message
        assert f"python -m flexens.members.convert {members_dir} --trust" in message

    err = one_line_error(capsys, "calibrate", config("calibrate", tmp_path))
    assert "seed=0.ckpt is an old pickled member" in err

    # thresholds.json naming the trap inside the members folder, and one anywhere on disk
    sha = hashlib.sha256(trap.read_bytes()).hexdigest()
    thresholds = members_dir / "thresholds.json"
    for name, match in (
        (trap.name, "seed=0.ckpt is an old pickled"),
        (str(elsewhere), "not a file name inside"),
    ):
        thresholds.write_text(json.dumps(thresholds_naming(name, sha)))
        err = one_line_error(capsys, "infer", config("infer", tmp_path))
        assert match in err
    assert not marker.exists()


def test_the_converter_unpickles_only_behind_trust(tmp_path: Path, capsys) -> None:
    """Without --trust: the files are listed, nothing is read; with it, the payload runs
    (which is why it takes --trust) and nothing is converted."""
    marker = tmp_path / "pwned"
    members_dir = tmp_path / "members"
    plant_booby_trap(members_dir, marker)
    assert convert_main([str(members_dir)]) == 2
    err = capsys.readouterr().err
    assert "seed=0.ckpt" in err and "--trust" in err and not marker.exists()
    assert convert_main([str(members_dir), "--trust"]) == 2
    assert marker.exists()  # the live payload: proof the test above was not vacuous
    assert "lacks its arch, meta or state_dict" in capsys.readouterr().err
    assert not member_path(members_dir, 0).exists()


def test_the_converter_turns_old_members_into_safe_ones(tmp_path: Path, capsys) -> None:
    made = make_member(tmp_path, 0)
    reference = load_member(made)
    members_dir = made.parent
    meta = {**reference.meta, "val_acc": float("nan")}  # older members recorded NaN
    old = members_dir / "seed=0.ckpt"
    state = load_safetensors(made.read_bytes())  # as trained (a loaded network is folded)
    torch.save(
        {"format": "flexens-member-v1", "arch": reference.arch, "meta": meta, "state_dict": state},
        old,
    )
    made.unlink()
    record_path(made).write_text(json.dumps({"arch": reference.arch, "sha256": "0" * 64}))

    with pytest.raises(ValueError, match="convert.*--trust"):
        load_ensemble(members_dir)
    assert convert_main([str(members_dir)]) == 2
    assert "--trust" in capsys.readouterr().err and not made.exists()

    assert convert_main([str(members_dir), "--trust"]) == 0
    out = capsys.readouterr().out
    assert "--trust: unpickling seed=0.ckpt" in out and "converted seed=0.ckpt" in out
    (member,) = load_ensemble(members_dir)  # the .ckpt beside it is no longer read
    assert member.path == made and member.meta["val_acc"] is None
    assert member.meta["recipe"] == reference.meta["recipe"]
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(member.network(x), reference.network(x))
    assert old.exists()
    assert convert_main([str(members_dir), "--trust"]) == 0  # nothing left to do
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.slow
def test_entry_points_refuse_a_booby_trap_without_a_traceback(tmp_path: Path) -> None:
    """The same, through calibrate.py, infer.py and the converter as a user runs them."""
    marker = tmp_path / "pwned"
    members_dir = tmp_path / MEMBERS
    trap = plant_booby_trap(members_dir, marker)
    sha = hashlib.sha256(trap.read_bytes()).hexdigest()
    (members_dir / "thresholds.json").write_text(json.dumps(thresholds_naming(trap.name, sha)))
    for script in ("calibrate.py", "infer.py"):
        result = run_script(script, f"paths.output_dir={tmp_path}", "logger=csv", check=False)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
        assert "seed=0.ckpt is an old pickled member" in line
    convert = [sys.executable, "-m", "flexens.members.convert", str(members_dir)]
    result = subprocess.run(convert, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--trust" in result.stderr
    assert not marker.exists()


# -- every bad file is one line naming it -----------------------------------------------------
def _truncated(path: Path) -> str:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path.name


def _empty(path: Path) -> str:
    path.write_bytes(b"")
    return path.name


def _garbage(path: Path) -> str:
    rewrite_weights(path, os.urandom(4096))
    return path.name


def _missing_tensor(path: Path) -> str:
    tensors = load_safetensors(path.read_bytes())
    tensors.pop(sorted(tensors)[-1])
    rewrite_weights(path, tensors)
    return path.name


def _other_width(path: Path) -> str:
    other = create_network("small_cnn", num_classes=10, in_chans=1, width=16, depth=4)
    rewrite_weights(path, {k: v.contiguous() for k, v in other.state_dict().items()})
    return path.name


def _nan_weights(path: Path) -> str:
    tensors = load_safetensors(path.read_bytes())
    key = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    rewrite_weights(path, tensors)
    return path.name


def _no_weights(path: Path) -> str:
    path.unlink()
    return path.name


def _no_record(path: Path) -> str:
    record_path(path).unlink()
    return record_path(path).name


def _record_not_json(path: Path) -> str:
    record_path(path).write_bytes(b'{"format": "flexens-member", "sha2')
    return record_path(path).name


def _record_wrong_type(path: Path) -> str:
    edit_record(path, num_classes="ten")
    return record_path(path).name


def _record_wrong_version(path: Path) -> str:
    edit_record(path, format_version=99)
    return record_path(path).name


def _record_of_the_old_format(path: Path) -> str:
    record = json.loads(record_path(path).read_text())
    del record["format"], record["format_version"]
    record_path(path).write_text(json.dumps(record))
    return record_path(path).name


def _record_of_another_file(path: Path) -> str:
    edit_record(path, sha256=hashlib.sha256(b"another file").hexdigest())
    return path.name


BAD_FILES = {
    "truncated": (_truncated, ValueError, "does not match the sha256"),
    "empty": (_empty, ValueError, "does not match the sha256"),
    "garbage": (_garbage, ValueError, "is not a readable safetensors file"),
    "missing-tensor": (_missing_tensor, ValueError, "lacks 1 tensors"),
    "other-width": (_other_width, ValueError, "the weights do not fit the record's arch"),
    "nan": (_nan_weights, ValueError, "holds NaN/Inf"),
    "no-weights": (_no_weights, FileNotFoundError, "does not exist"),
    "no-record": (_no_record, FileNotFoundError, "so it is unfinished"),
    "record-not-json": (_record_not_json, ValueError, "is not valid JSON"),
    "record-wrong-type": (_record_wrong_type, ValueError, "field 'num_classes' must be an"),
    "record-wrong-version": (_record_wrong_version, ValueError, "format_version 99"),
    "record-old-format": (_record_of_the_old_format, ValueError, "convert old members"),
    "hash-mismatch": (_record_of_another_file, ValueError, "does not match the sha256"),
}


@pytest.mark.parametrize("damage", BAD_FILES, ids=list(BAD_FILES))
def test_every_bad_member_file_is_one_line_naming_it(tmp_path: Path, capsys, damage) -> None:
    make_member(tmp_path, 0)
    bad = make_member(tmp_path, 1)
    members_dir = bad.parent
    thresholds = members_dir / "thresholds.json"
    thresholds.write_text('{"published": true}')
    damage_file, error, match = BAD_FILES[damage]
    named = damage_file(bad)
    before = snapshot(members_dir)

    with pytest.raises(error) as info:
        load_member(bad)
    message = str(info.value)
    assert match in message and named in message and "\n" not in message, message
    assert any(fix in message for fix in FIXES), message
    if damage != "no-weights":  # a lost weights file is simply not a member any more
        with pytest.raises(error, match=match):
            load_ensemble(members_dir)
        err = one_line_error(capsys, "calibrate", config("calibrate", tmp_path))
        assert named in err and match in err
    assert snapshot(members_dir) == before  # nothing published was touched


def test_duplicate_members_are_refused_naming_both(tmp_path: Path) -> None:
    first = make_member(tmp_path, 0)
    make_member(tmp_path, 1)
    members_dir = first.parent
    assert [m.seed for m in load_ensemble(members_dir)] == [0, 1]
    with pytest.raises(ValueError, match=r"seed=0\.safetensors is listed twice"):
        load_ensemble(members_dir, [0, 0])
    for copy in ("seed=05", "seed=7"):
        for suffix in (".safetensors", ".json"):
            shutil.copy(first.with_suffix(suffix), members_dir / f"{copy}{suffix}")
        with pytest.raises(ValueError) as info:
            load_ensemble(members_dir)
        message = str(info.value)
        assert f"seed=0.safetensors and {copy}.safetensors hold the same weights" in message
        for suffix in (".safetensors", ".json"):
            (members_dir / f"{copy}{suffix}").unlink()
    # a renamed member: its record still says which seed it is
    first.rename(members_dir / "seed=9.safetensors")
    record_path(first).rename(members_dir / "seed=9.json")
    with pytest.raises(ValueError, match="named for seed 9 but its record says seed 0"):
        load_ensemble(members_dir)


# -- thresholds.json names members inside the members folder -------------------------------
def test_thresholds_name_members_by_file_inside_the_members_folder(tmp_path: Path) -> None:
    paths = [make_member(tmp_path, s) for s in (0, 1)]
    members = load_ensemble(paths[0].parent)
    described = [m.describe() for m in members]
    assert [d["path"] for d in described] == ["seed=0.safetensors", "seed=1.safetensors"]
    assert described[0]["sha256"] == hashlib.sha256(paths[0].read_bytes()).hexdigest()
    thresholds = tmp_path / "elsewhere" / "thresholds.json"
    thresholds.parent.mkdir()

    def with_members(members: list[dict]) -> None:
        thresholds.write_text(
            json.dumps({**thresholds_naming("", ""), "members": members, "thresholds": [0.5]})
        )

    with_members(described)
    loaded, _ = load_calibrated_members(thresholds, paths[0].parent)
    assert [m.path for m in loaded] == paths
    for name in ("../seed=0.safetensors", str(paths[0]), "sub/seed=0.safetensors", ".."):
        with_members([{**described[0], "path": name}, described[1]])
        with pytest.raises(ValueError, match="not a file name inside the members folder"):
            load_calibrated_members(thresholds, paths[0].parent)
    with_members([described[0], {**described[1], "sha256": "0" * 64}])
    with pytest.raises(ValueError, match=r"seed=1\.safetensors changed since .* was calibrated"):
        load_calibrated_members(thresholds, paths[0].parent)
    with_members([described[0], {**described[0]}])
    with pytest.raises(ValueError, match="hold the same weights"):
        load_calibrated_members(thresholds, paths[0].parent)


# -- finished means complete, and trained with this recipe ----------------------------------
def test_a_finished_member_of_another_recipe_is_an_error(tmp_path: Path, capsys) -> None:
    path = make_member(tmp_path, 0)
    before = snapshot(path.parent)
    train_member(config("train", tmp_path, "seed=0"))
    assert "skipped (exists)" in capsys.readouterr().out
    err = one_line_error(capsys, "train", config("train", tmp_path, "model.kwargs.width=32"))
    assert "model.kwargs.width: 8 -> 32" in err
    assert "train.force=true" in err and "ensemble.name=" in err
    err = one_line_error(
        capsys, "train", config("train", tmp_path, "trainer.max_epochs=2", "train.scheduler=cosine")
    )
    assert "trainer.max_epochs: 1 -> 2" in err and 'train.scheduler: "onecycle" -> "cosine"' in err
    assert snapshot(path.parent) == before


def test_an_untrained_member_is_refused_before_anything_is_written(tmp_path, capsys) -> None:
    err = one_line_error(capsys, "train", config("train", tmp_path, "trainer.max_epochs=0"))
    assert "trainer.max_epochs=0 would publish an untrained member" in err
    assert not (tmp_path / MEMBERS).exists()


def test_non_finite_weights_are_never_published(tmp_path: Path) -> None:
    path = make_member(tmp_path, 0)
    before = snapshot(path.parent)
    arch = load_member(path).arch
    network = create_network(**arch)
    with torch.no_grad():
        next(network.parameters()).fill_(float("inf"))
    with pytest.raises(ValueError, match="seed=0.safetensors was not written: 1 of its tensors"):
        save_member(path, network, arch, {"num_classes": 10})
    assert snapshot(path.parent) == before


def test_a_diverged_member_is_never_published(tmp_path: Path, capsys) -> None:
    cfg = config("train", tmp_path, *TINY, "train.optimizer.lr=1e30")
    err = one_line_error(capsys, "train", cfg)
    assert "seed=0.safetensors was not written" in err and "NaN/Inf" in err
    assert not list((tmp_path / MEMBERS).glob("seed=*"))
    assert not (tmp_path / MEMBERS / ".work" / "seed=0").exists()  # no resuming into NaN


def test_no_training_step_publishes_nothing(tmp_path: Path, capsys) -> None:
    cfg = config(
        "train", tmp_path, "+trainer.limit_train_batches=0", "train.scheduler=none", *TINY[1:3]
    )
    err = one_line_error(capsys, "train", cfg)
    assert "seed=0 took no training step" in err
    assert not list((tmp_path / MEMBERS).glob("seed=*"))


def test_an_unfinished_member_is_retrained_with_a_warning(tmp_path: Path, capsys) -> None:
    """Killed between the weights and the record: the weights alone are not a member."""
    path = make_member(tmp_path, 0, *TINY)
    record_path(path).unlink()
    stale = path.read_bytes()
    with pytest.raises(FileNotFoundError, match="unfinished"):
        load_ensemble(path.parent)
    train_member(config("train", tmp_path, *TINY))
    out = capsys.readouterr().out
    assert "warning: seed=0.safetensors is not a finished member" in out and "retraining" in out
    member = load_member(path)
    assert member.meta["epochs"] == 1 and path.read_bytes() != stale
    assert json.loads(record_path(path).read_text())["sha256"] == member.sha256


def test_a_corrupt_resume_checkpoint_is_set_aside_and_training_restarts(tmp_path, capsys):
    cfg = config("train", tmp_path, *TINY)
    work = tmp_path / MEMBERS / ".work" / "seed=0"
    work.mkdir(parents=True)
    (work / "recipe.txt").write_text(fingerprint([training_recipe(cfg)]))
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "epoch": 0}, work / "last.ckpt")
    damaged = (work / "last.ckpt").read_bytes()[:500]
    (work / "last.ckpt").write_bytes(damaged)  # truncated mid-write
    train_member(cfg)
    out = capsys.readouterr().out
    assert f"the resume checkpoint {work / 'last.ckpt'} is unreadable" in out
    assert "training from scratch" in out and "resuming from" not in out
    aside = work.parent / "seed=0.last.ckpt.corrupt"
    assert aside.read_bytes() == damaged
    assert load_member(member_path(tmp_path / MEMBERS, 0)).seed == 0
    assert not work.exists()


BAD_THRESHOLDS = {
    "not-json": (lambda d: "{ truncated", "is not readable JSON"),
    "a-list": (lambda d: [], "holds list, not an object"),
    "old-format": (lambda d: {**d, "format": None}, "has format None"),
    "thresholds-null": (lambda d: {**d, "thresholds": None}, "field 'thresholds' must be list"),
    "members-a-dict": (lambda d: {**d, "members": {}}, "field 'members' must be list"),
    "member-without-hash": (
        lambda d: {**d, "members": [{"path": "seed=0.safetensors"}]},
        "field 'sha256' must be str",
    ),
    "nan-threshold": (
        lambda d: {**d, "members": d["members"] * 2, "thresholds": [float("nan")]},
        "must hold finite numbers",
    ),
    "extra-threshold": (lambda d: {**d, "thresholds": [0.5]}, "1 thresholds for 1 members"),
    "no-full-summary": (
        lambda d: {**d, "calibration": {"num_samples": 3}},
        "field 'flexible' must be dict",
    ),
    "fuse-from-past-the-members": (
        lambda d: {**d, "members": d["members"] * 3, "thresholds": [0.5, 0.5], "fuse_from": 2},
        "fuse_from must be null or a stage in 1..1, got 2",
    ),
    "fuse-from-a-string": (
        lambda d: {**d, "members": d["members"] * 3, "thresholds": [0.5, 0.5], "fuse_from": "1"},
        "fuse_from must be null or a stage in 1..1",
    ),
}


@pytest.mark.parametrize("damage", BAD_THRESHOLDS, ids=list(BAD_THRESHOLDS))
def test_every_bad_thresholds_file_is_one_line_naming_it(tmp_path: Path, damage) -> None:
    from flexens.calibration.schema import read_thresholds

    edit, match = BAD_THRESHOLDS[damage]
    path = tmp_path / "thresholds.json"
    good = thresholds_naming("seed=0.safetensors", "0" * 64)
    path.with_name("good.json").write_text(json.dumps(good))
    assert read_thresholds(path.with_name("good.json")).members[0].sha256 == "0" * 64
    bad = edit(good)
    path.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    with pytest.raises(ValueError) as info:
        read_thresholds(path)
    message = str(info.value)
    assert match in message and str(path) in message and "recalibrate" in message, message
    assert "\n" not in message


def test_a_model_name_other_than_the_arch_is_said_to_be_only_a_label(tmp_path, capsys):
    out = train_member(config("train", tmp_path, *TINY, "model.name=not_a_model"))
    note = (
        "note: model.name=not_a_model only names the ensemble (digits-not_a_model); "
        "the network is model.arch=small_cnn"
    )
    assert note in capsys.readouterr().out
    assert out.parent.name == "digits-not_a_model"
    assert load_member(out).arch["arch"] == "small_cnn"
