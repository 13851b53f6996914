"""Scaling out: trainer/launcher/experiment configs, DDP, resuming, sweep reruns, pretrained members.

Training runs go through ``python train.py`` in a subprocess, as a user would run them, with
every output under ``tmp_path`` (``paths.output_dir``); the repository's ``outputs/`` is
never touched.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from flexens.members.networks import create_network
from flexens.members.registry import load_member
from flexens.tasks.distributed import _starts_ranks_itself

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
TRAINERS = sorted(p.stem for p in (CONF / "trainer").glob("*.yaml"))
DIGITS_RUN = ["data=digits", "model=small_cnn", "logger=csv", "train.progress_bar=false"]
RESTORED = "Restoring states from the checkpoint path"
# our launcher files shadow the plugins' configs of the same name; Hydra says so, harmlessly
pytestmark = pytest.mark.filterwarnings(r"ignore:\s*'hydra/launcher/\w+' is validated against")


# -- helpers ------------------------------------------------------------------------------
def _compose(overrides: list[str], hydra: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=hydra)


def _resolved(cfg: DictConfig, key: str) -> dict:
    return OmegaConf.to_container(OmegaConf.select(cfg, key), resolve=True)


def _env() -> dict[str, str]:
    env = dict(os.environ, FLEXENS_ROOT=str(ROOT), HYDRA_FULL_ERROR="1", WANDB_MODE="offline")
    for key in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK"):
        env.pop(key, None)  # a stray launcher variable would make Lightning skip spawning
    return env


def _train(out: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py", *overrides, *DIGITS_RUN, f"paths.output_dir={out}"]
    result = subprocess.run(
        cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def _members_dir(out: Path) -> Path:
    return out / "members" / "digits-small_cnn"


@pytest.fixture
def root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What train.py sets, and an ImageNet root so imagefolder configs resolve."""
    monkeypatch.setenv("FLEXENS_ROOT", str(ROOT))
    monkeypatch.setenv("FLEXENS_IMAGEFOLDER_ROOT", str(tmp_path / "imagenet"))
    for key in ("SLURM_NNODES", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(key, raising=False)


# -- configs compose ---------------------------------------------------------------------
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_resolves(root_env: None, experiment: str) -> None:
    cfg = _compose([f"experiment={experiment}"], hydra=True)
    for key in ("data", "model", "train", "trainer", "paths", "ensemble"):
        assert _resolved(cfg, key), key
    optimizer = instantiate(cfg.train.optimizer)(params=[torch.nn.Parameter(torch.zeros(1))])
    assert optimizer.param_groups[0]["lr"] == cfg.train.optimizer.lr
    assert cfg.train.scheduler in ("onecycle", "cosine", "none")
    assert Path(cfg.paths.members_dir).is_absolute()


def test_imagenet_recipes(root_env: None) -> None:
    alexnet = _compose(["experiment=imagenet_alexnet"])
    assert (alexnet.data.name, alexnet.model.arch, alexnet.data.batch_size) == (
        "imagenet",
        "alexnet",
        128,
    )
    assert alexnet.train.optimizer.lr == 0.01 and alexnet.train.optimizer.weight_decay == 5e-4
    assert alexnet.train.optimizer.momentum == 0.9 and not alexnet.train.optimizer.nesterov
    assert (alexnet.trainer.max_epochs, alexnet.train.scheduler) == (90, "cosine")

    resnet = _compose(["experiment=imagenet_resnet50"])
    assert (resnet.model.arch, resnet.data.batch_size, resnet.trainer.max_epochs) == (
        "resnet50",
        256,
        90,
    )
    assert resnet.train.optimizer.lr == 0.1 and resnet.train.optimizer.nesterov
    assert resnet.train.optimizer.weight_decay == 1e-4 and resnet.train.scheduler == "cosine"
    assert resnet.train.label_smoothing == 0.1 and resnet.train.channels_last
    assert resnet.trainer.precision == "bf16-mixed"
    assert resnet.ensemble.name == "imagenet-resnet50"

    cifar = _compose(["experiment=cifar10_resnet"])
    assert (cifar.data.name, cifar.model.arch, cifar.ensemble.name) == (
        "cifar10",
        "resnet18",
        "cifar10-resnet18",
    )
    # the trainer group stays free: an experiment runs on any of them
    ddp = _compose(["experiment=imagenet_resnet50", "trainer=ddp"])
    assert ddp.trainer.strategy == "ddp" and ddp.trainer.precision == "bf16-mixed"


@pytest.mark.parametrize("trainer", TRAINERS)
def test_trainer_config_composes(root_env: None, trainer: str) -> None:
    cfg = _compose(
        [f"trainer={trainer}", "trainer.precision=bf16-mixed", "trainer.accumulate_grad_batches=4"]
    )
    resolved = _resolved(cfg, "trainer")
    assert resolved["_target_"] == "pytorch_lightning.Trainer"
    assert resolved["precision"] == "bf16-mixed" and resolved["accumulate_grad_batches"] == 4
    if trainer != "default":
        assert {"accelerator", "devices", "num_nodes", "strategy", "sync_batchnorm"} <= set(
            resolved
        )


def test_ddp_trainer_builds_on_cpu(
    root_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _compose(
        [
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            f"paths.output_dir={tmp_path}",
        ]
    )
    trainer = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    assert trainer.world_size == 2 and type(trainer.strategy).__name__ == "DDPStrategy"
    assert _starts_ranks_itself(trainer)  # so train_member pins the children to this job
    monkeypatch.setenv("LOCAL_RANK", "1")  # a child rank, or torchrun: ranks come from outside
    assert not _starts_ranks_itself(trainer)
    single = _compose(["trainer=cpu", f"paths.output_dir={tmp_path}"])
    assert not _starts_ranks_itself(instantiate(single.trainer, logger=False))


def test_multinode_trainer_follows_slurm_allocation(
    root_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = _resolved(_compose(["trainer=ddp_multinode"]), "trainer")
    assert (outside["devices"], outside["num_nodes"]) == ("auto", 1)
    monkeypatch.setenv("SLURM_NNODES", "4")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8")
    inside = _resolved(_compose(["trainer=ddp_multinode"]), "trainer")
    assert (inside["devices"], inside["num_nodes"]) == (8, 4)


@pytest.mark.parametrize(
    ("launcher", "overrides", "cls"),
    [
        ("basic", [], "BasicLauncher"),
        ("joblib", ["hydra.launcher.n_jobs=3"], "JoblibLauncher"),
        (
            "submitit_slurm",
            [
                "hydra.launcher.partition=gpu",
                "hydra.launcher.gpus_per_node=4",
                "hydra.launcher.nodes=2",
            ],
            "SlurmLauncher",
        ),
    ],
)
def test_launcher_config_instantiates(
    root_env: None, launcher: str, overrides: list[str], cls: str
) -> None:
    cfg = _compose([f"hydra/launcher={launcher}", *overrides], hydra=True)
    assert cfg.hydra.launcher._target_.endswith(f".{cls}")
    if launcher == "basic":  # Hydra's own; its target policy refuses to build it from config
        return
    built = instantiate(cfg.hydra.launcher)
    assert type(built).__name__ == cls
    if launcher == "joblib":
        assert built.joblib["n_jobs"] == 3
    if launcher == "submitit_slurm":
        params = built.params
        assert (params["partition"], params["gpus_per_node"], params["nodes"]) == ("gpu", 4, 2)
        assert params["tasks_per_node"] == 4  # one DDP process per GPU
        assert params["timeout_min"] > 0 and params["cpus_per_task"] > 0
    # the members dir never depends on the launcher: absolute, from FLEXENS_ROOT
    assert cfg.paths.members_dir == f"{ROOT}/outputs/members/digits-small_cnn"


def test_submitit_cfg_from_the_command_line() -> None:
    cmd = [
        sys.executable,
        "train.py",
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.partition=gpu",
        "--cfg",
        "hydra",
    ]
    result = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "partition: gpu" in result.stdout
    assert "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in result.stdout


# -- pretrained members ------------------------------------------------------------------
TINY_TIMM = "test_resnet"  # timm's 370k-parameter test ResNet


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_local_file_loads_all_but_the_head(tmp_path: Path, suffix: str) -> None:
    source = create_network(TINY_TIMM, num_classes=1000)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    weights = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(weights))
    else:
        torch.save(state, weights)
    net = create_network(TINY_TIMM, num_classes=10, pretrained=str(weights))
    head = {"fc.weight", "fc.bias"}
    loaded = net.state_dict()
    assert loaded["fc.weight"].shape == (10, source.fc.in_features)
    same = {k for k in state if k not in head and torch.equal(state[k], loaded[k])}
    assert same == set(state) - head


def test_pretrained_member_checkpoint_warm_starts(tmp_path: Path) -> None:
    """A Lightning checkpoint of a member (keys ``net.*``) also works as pretrained weights."""
    source = create_network("small_cnn", num_classes=10, in_chans=1)
    weights = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in source.state_dict().items()}}, weights)
    net = create_network("small_cnn", num_classes=10, in_chans=1, pretrained=str(weights))
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in source.state_dict().items())


def test_pretrained_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model.pretrained"):
        create_network(TINY_TIMM, num_classes=10, pretrained=str(tmp_path / "nope.pth"))


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No network and an empty cache; huggingface_hub reads its env at import, so patch both."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))

    def hung(signum, frame):
        raise TimeoutError("the hub lookup hung despite HF_HUB_OFFLINE=1")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(
    ("pretrained", "name"), [(True, "test_resnet"), ("r160_in1k", "test_resnet.r160_in1k")]
)
def test_pretrained_hub_offline_fails_in_one_line(offline_hub: None, pretrained, name: str) -> None:
    with pytest.raises(ConnectionError) as info:
        create_network(TINY_TIMM, num_classes=10, pretrained=pretrained)
    message = str(info.value)
    assert message.startswith(f"could not fetch pretrained weights {name!r}")
    assert "model.pretrained=" in message and "\n" not in message


def test_pretrained_hub_tag_needs_a_timm_model() -> None:
    with pytest.raises(ValueError, match="names hub weights, which .small_cnn. has none"):
        create_network("small_cnn", num_classes=10, pretrained="imagenet")


# -- training runs (slow) ------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_two_cpu_processes_train_a_loadable_member(tmp_path: Path) -> None:
    result = _train(
        tmp_path,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_epochs=1",
    )
    assert "Starting with 2 processes" in result.stdout + result.stderr
    member = load_member(_members_dir(tmp_path) / "seed=0.safetensors")
    assert member.meta["epochs"] == 1 and member.num_classes == 10
    assert not (_members_dir(tmp_path) / ".work" / "seed=0").exists()
    # rank 1 re-ran train.py into the same run folder, without a second member or config dump
    (run_dir,) = (tmp_path / "runs" / "train").iterdir()
    assert (run_dir / "train_ddp_process_1.log").is_file()


@pytest.mark.slow
def test_ddp_inside_a_seed_sweep_trains_each_member_once(tmp_path: Path) -> None:
    """Lightning re-runs sys.argv for rank 1: in a sweep that must be this job, not the sweep."""
    result = _train(
        tmp_path,
        "-m",
        "seed=0,1",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_epochs=1",
    )
    output = result.stdout + result.stderr
    assert output.count("Starting with 2 processes") == 2
    for seed in (0, 1):
        assert load_member(_members_dir(tmp_path) / f"seed={seed}.safetensors").seed == seed
    (sweep,) = (tmp_path / "multirun" / "train").iterdir()  # the children started no sweep
    for job in ("0", "1"):
        assert (sweep / job / "train_ddp_process_1.log").is_file()


def _epochs_logged(run_dir: Path) -> set[int]:
    (metrics,) = run_dir.glob("*/version_*/metrics.csv")
    with metrics.open() as f:
        return {int(row["epoch"]) for row in csv.DictReader(f)}


@pytest.mark.slow
def test_killed_member_run_resumes_from_last_checkpoint(tmp_path: Path) -> None:
    work = _members_dir(tmp_path) / ".work" / "seed=0"
    last, member = work / "last.ckpt", _members_dir(tmp_path) / "seed=0.safetensors"
    # ~80 steps an epoch: after the first checkpoint, two epochs remain to kill the run in
    overrides = ["trainer.max_epochs=3", "data.batch_size=16"]
    cmd = [sys.executable, "train.py", *overrides, *DIGITS_RUN, f"paths.output_dir={tmp_path}"]
    first_log = tmp_path / "first.log"
    with first_log.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 400
            # Lightning writes checkpoints atomically (temp file, then rename)
            while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            alive = proc.poll() is None
            proc.kill()  # SIGKILL: no handler, no cleanup, like a preempted or OOM-killed job
        finally:
            proc.kill()
            proc.wait()
    assert alive and last.is_file(), (
        "no checkpoint to resume from: " + first_log.read_text()[-3000:]
    )
    assert not member.exists()
    saved_epoch = torch.load(last, map_location="cpu", weights_only=False)["epoch"]
    assert saved_epoch in (0, 1)
    runs = tmp_path / "runs" / "train"
    before = set(runs.iterdir())

    result = _train(tmp_path, *overrides, timeout=400)
    assert RESTORED in result.stdout + result.stderr
    assert load_member(member).meta["epochs"] == 3
    assert not work.exists()
    (rerun,) = set(runs.iterdir()) - before
    assert min(_epochs_logged(rerun)) == saved_epoch + 1  # continued, did not start over


@pytest.mark.slow
def test_seed_sweep_rerun_skips_finished_members(tmp_path: Path) -> None:
    """Trained in parallel by joblib, then skipped by the basic launcher: one members dir."""
    sweep = ["-m", "seed=0,1", "trainer.max_epochs=1"]
    _train(tmp_path, *sweep, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    files = [
        _members_dir(tmp_path) / f"seed={s}{ext}"
        for s in (0, 1)
        for ext in (".safetensors", ".json")
    ]
    mtimes = [f.stat().st_mtime_ns for f in files]
    result = _train(tmp_path, *sweep)
    assert result.stdout.count("skipped (exists)") == 2
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert RESTORED not in result.stdout + result.stderr


@pytest.mark.slow
def test_submitit_launcher_writes_to_the_shared_members_dir(tmp_path: Path) -> None:
    """submitit's local executor pickles the job like SLURM does; the member lands in one place."""
    _train(tmp_path, "-m", "hydra/launcher=submitit_local", "seed=3", "trainer.max_epochs=1")
    assert load_member(_members_dir(tmp_path) / "seed=3.safetensors").seed == 3
