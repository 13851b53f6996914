"""Every shipped model and experiment config trains, calibrates and infers, at toy scale.

The habit of the lightning-hydra-template (``experiment=glob(*)``): the configs in
``conf/model`` and ``conf/experiment`` are discovered when the tests are collected, so a new
config is tested without anyone adding it here. Members train on a generated ImageFolder tree
of a few odd images (grayscale, palette, RGBA, CMYK; JPEG and PNG) or on the digits, for two
batches. Most runs go in-process through Hydra's compose API (one interpreter start for all);
``test_model_configs_through_the_entry_points`` and the README's scaling-out commands go
through ``train.py``/``calibrate.py``/``infer.py`` as a user runs them. Every output lands in
``tmp_path``; the repository's ``outputs/`` is never touched.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from conftest import ROOT, make_image_tree, run_script
from flexens.cli import run as cli_run
from flexens.members.networks import create_network
from flexens.members.registry import load_member
from flexens.memo import SweepMemo
from flexens.tasks.calibrate import calibrate
from flexens.tasks.infer import infer
from flexens.tasks.train import member_arch, train_member

CONF = ROOT / "conf"
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))

MIN_IMAGE_SIZE = {"alexnet": 64}
"""Smallest toy image an architecture takes; AlexNet's stride-4 stem and three stride-2
max-pools need about 63 px, every other shipped model runs at 32."""
TOY_IMAGE_SIZE = 32
NOT_FOR_DIGITS = {"alexnet": "alexnet takes 3-channel images, this data has 1"}
"""Architectures that refuse the 1-channel 8x8 digits, and the error they give instead."""
FAST = {
    # in-process, one per architecture family besides the entry-point sweep and the
    # heterogeneous ensemble; the rest (and every new config) runs with the slow tests
    "experiment=cifar10",  # small_cnn
    "experiment=cifar10_resnet",  # timm ResNet-18
}
ENTRY_POINT_FAST_MODELS = ("small_cnn", "resnet18")
"""Models whose real-entry-point sweep is in the fast set; the others (AlexNet writes 460 MB
checkpoints, ResNet-50) and any new model config sweep with the slow tests."""
TRAIN_TINY = [
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "trainer.accelerator=cpu",
    "trainer.log_every_n_steps=1",
    "train.progress_bar=false",
]
CALIBRATE_TINY = ["calibrate.profile_batch_size=4"]
INFER_TINY = [
    "infer.latency_images=4",
    "infer.throughput_images=8",
    "infer.batch_size=4",
    "infer.warmup=1",
]
TREE_CLASSES = ("n01", "n02", "n03")
TREE_COUNTS = {"train": 8}  # per class; every other split 4
EVAL_IMAGES = 4 * len(TREE_CLASSES)

# our launcher files shadow the plugins' configs of the same name; Hydra says so, harmlessly
pytestmark = [
    pytest.mark.filterwarnings(r"ignore:\s*'hydra/launcher/\w+' is validated against"),
    # train.py stamps the recipe into the checkpoint folder before Lightning's first save
    pytest.mark.filterwarnings(r"ignore:Checkpoint directory .* exists and is not empty"),
    pytest.mark.usefixtures("one_thread"),  # conftest: one thread, no calibration left behind
]


# -- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``image_tree("train", "val")``: a tiny ImageFolder tree with those splits, made once."""
    made: dict[tuple[str, ...], Path] = {}

    def tree(*splits: str) -> Path:
        if splits not in made:
            root = tmp_path_factory.mktemp("tree-" + "-".join(splits))
            made[splits] = make_image_tree(root, splits, TREE_CLASSES, TREE_COUNTS)
        return made[splits]

    return tree


def compose_cfg(task: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(task, overrides=overrides)


def toy_data(selection: list[str], image_tree: Callable[..., Path]) -> list[str]:
    """Overrides that shrink the data ``selection`` (``experiment=...``, ``data=...``) picks."""
    cfg = compose_cfg("train", selection)
    target = cfg.data._target_
    if target.endswith("DigitsDataModule"):
        return ["data.batch_size=16", "data.eval_batch_size=128"]
    if not target.endswith("ImageFolderDataModule"):
        pytest.fail(f"no toy version of data module {target}; teach toy_data() about it")
    tree = image_tree(cfg.data.train_split, cfg.data.test_split)
    size = MIN_IMAGE_SIZE.get(cfg.model.arch, TOY_IMAGE_SIZE)
    return [
        f"data.root={tree}",
        f"data.image_size={size}",
        "data.batch_size=4",
        "data.eval_batch_size=8",
        "data.num_workers=0",
        "++data.pin_memory=false",
        "++data.persistent_workers=false",
        "data.calib_fraction=0.25",  # 6 of 24 images: two per class for the stratified split
    ]


def train_calibrate_infer(
    out: Path, common: list[str], seeds=(0, 1)
) -> tuple[DictConfig, dict, dict]:
    """The three entry points' work, in this process: members, thresholds.json, metrics."""
    common = [*common, f"paths.output_dir={out}", "logger=csv"]
    for seed in seeds:
        cfg = compose_cfg(
            "train", [*common, *TRAIN_TINY, f"seed={seed}", f"paths.run_dir={out}/train-{seed}"]
        )
        train_member(cfg)
    report = calibrate(
        compose_cfg(
            "calibrate",
            [*common, *CALIBRATE_TINY, "device=cpu", f"paths.run_dir={out}/cal"],
        ),
        SweepMemo(),
    )
    metrics = infer(
        compose_cfg(
            "infer",
            [*common, *INFER_TINY, "device=cpu", f"paths.run_dir={out}/infer"],
        )
    )
    return cfg, report, metrics


def check_ensemble(cfg: DictConfig, report: dict, metrics: dict, seeds=(0, 1)) -> None:
    members_dir = Path(cfg.paths.members_dir)
    for seed in seeds:
        member = load_member(members_dir / f"seed={seed}.safetensors")
        assert member.arch["arch"] == cfg.model.arch and member.seed == seed
        assert member.meta["recipe"]["trainer"]["precision"] == cfg.trainer.precision
        assert member.meta["recipe"]["train"]["scheduler"] == cfg.train.scheduler
    assert sorted(m["seed"] for m in report["members"]) == sorted(seeds)
    assert len(report["thresholds"]) == len(seeds) - 1
    assert (
        json.loads((members_dir / "thresholds.json").read_text())["members"] == (report["members"])
    )
    assert metrics["members"] == len(seeds)
    for mode in ("flexible", "full"):
        assert sum(metrics[mode]["exit_histogram"]) == metrics["test_samples"]
        assert 1 <= metrics[mode]["avg_members"] <= len(seeds)
        assert metrics[mode]["latency_mean_ms"] > 0
    assert metrics["full"]["avg_members"] == len(seeds)


# -- the fix: kwargs ----------------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS)
def test_member_arch_of_every_model_config(model: str) -> None:
    """``kwargs: {}`` (every model but the default) is an empty mapping, not an error."""
    cfg = compose_cfg("train", [f"model={model}"])
    arch = member_arch(cfg, num_classes=3, in_chans=3)
    expected = OmegaConf.to_container(cfg.model.kwargs) if cfg.model.get("kwargs") else {}
    assert arch == {
        "arch": cfg.model.arch,
        "num_classes": 3,
        "in_chans": 3,
        "pretrained": None,
        **expected,
    }
    assert isinstance(create_network(**arch), torch.nn.Module)


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18", "alexnet"])
def test_a_kwarg_the_architecture_does_not_take_is_a_user_error(arch: str) -> None:
    with pytest.raises(ValueError) as info:
        create_network(arch, num_classes=3, in_chans=3, widht=8)
    message = str(info.value)
    assert message.startswith(f"model.kwargs.widht is not an argument of the {arch!r}")
    assert "remove model.kwargs.widht" in message and "\n" not in message
    assert "accepts: " in message  # what would work instead


def test_a_kwarg_error_names_what_the_architecture_accepts() -> None:
    with pytest.raises(ValueError, match=r"\(SmallConvNet accepts: width, depth, dropout\)"):
        create_network("small_cnn", num_classes=3, widht=8)
    with pytest.raises(ValueError, match=r"\(AlexNet accepts: dropout\)"):
        create_network("alexnet", num_classes=3, foo=1)
    with pytest.raises(ValueError, match=r"\(ResNet accepts: .*drop_rate"):
        create_network("resnet18", num_classes=3, foo=1)
    # timm builds the network before fetching weights: a bad kwarg is no network error
    with pytest.raises(ValueError, match="model.kwargs.foo is not an argument"):
        create_network("resnet18", num_classes=3, pretrained=True, foo=1)
    # a kwarg that is accepted but wrong in another way stays the library's own error
    with pytest.raises(TypeError):
        create_network("small_cnn", num_classes=3, width="wide")


@pytest.mark.parametrize("kwargs", [[1], 3, "width=8"])
def test_model_kwargs_must_be_a_mapping(kwargs) -> None:
    cfg = OmegaConf.create({"model": {"arch": "small_cnn", "kwargs": kwargs}})
    with pytest.raises(ValueError, match="model.kwargs must map constructor arguments"):
        member_arch(cfg, num_classes=3, in_chans=1)
    cfg.model.kwargs = None  # a model config without kwargs
    assert member_arch(cfg, 3, 1) == {
        "arch": "small_cnn",
        "num_classes": 3,
        "in_chans": 1,
        "pretrained": None,
    }


def _private_paths(tmp_path: Path) -> list[str]:
    """Outputs and the run folder (else the cwd, outside a Hydra run) under ``tmp_path``."""
    return [f"paths.output_dir={tmp_path}", f"paths.run_dir={tmp_path}/run"]


def _cli_error(capsys: pytest.CaptureFixture, task: str, cfg: DictConfig) -> str:
    """What ``python <task>.py ...`` prints on a user error: one line, exit code 2."""
    with pytest.raises(SystemExit) as exit_info:
        cli_run(task, cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["model=small_cnn", "+model.kwargs.widht=8"], "model.kwargs.widht is not an argument"),
        (["model=resnet18", "+model.kwargs.foo=1"], "model.kwargs.foo is not an argument"),
        (["model=resnet18", "+model.kwargs.num_classes=5"], "model.kwargs.num_classes is set by"),
        (["model.arch=not_a_model"], "unknown model architecture 'not_a_model'"),
    ],
    ids=["small_cnn-typo", "resnet18-foo", "reserved", "unknown-arch"],
)
def test_bad_model_settings_end_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, overrides: list[str], match: str
) -> None:
    cfg = compose_cfg("train", ["data=digits", *overrides, *_private_paths(tmp_path), "logger=csv"])
    assert match in _cli_error(capsys, "train", cfg)
    assert not list(tmp_path.glob("members/*/seed=*.safetensors"))


# -- every config, end to end -------------------------------------------------------------
def _arch(selection: list[str]) -> str:
    return compose_cfg("train", selection).model.arch


def _case_params() -> list:
    """Each model on the digits (models on image trees: the entry-point sweeps below), and
    each experiment on its own data."""
    cases = [(f"model={m}", "data=digits") for m in MODELS]
    cases += [(f"experiment={e}", None) for e in EXPERIMENTS]
    params = []
    for selection, data in cases:
        case = selection if data is None else f"{selection} {data}"
        refused = data == "data=digits" and _arch([selection]) in NOT_FOR_DIGITS
        marks = [] if case in FAST or refused else [pytest.mark.slow]
        params.append(pytest.param(selection, data, marks=marks, id=case.replace(" ", "-")))
    return params


@pytest.mark.parametrize(("selection", "data"), _case_params())
def test_config_trains_calibrates_and_infers(
    tmp_path: Path, image_tree, capsys: pytest.CaptureFixture, selection: str, data: str | None
) -> None:
    chosen = [selection] + ([data] if data else [])
    arch = _arch(chosen)
    if data == "data=digits" and arch in NOT_FOR_DIGITS:
        cfg = compose_cfg("train", [*chosen, *_private_paths(tmp_path), "logger=csv"])
        assert NOT_FOR_DIGITS[arch] in _cli_error(capsys, "train", cfg)
        return
    cfg, report, metrics = train_calibrate_infer(tmp_path, [*chosen, *toy_data(chosen, image_tree)])
    check_ensemble(cfg, report, metrics)
    is_digits = cfg.data._target_.endswith("DigitsDataModule")
    assert metrics["test_samples"] == (450 if is_digits else EVAL_IMAGES)


def _sweep_params() -> list:
    fast = [m for m in MODELS if m in ENTRY_POINT_FAST_MODELS]
    rest = [m for m in MODELS if m not in ENTRY_POINT_FAST_MODELS]
    params = [pytest.param(fast, id=",".join(fast))] if fast else []
    if rest:
        params.append(pytest.param(rest, marks=pytest.mark.slow, id=",".join(rest)))
    return params


@pytest.mark.parametrize("models", _sweep_params())
def test_model_configs_through_the_entry_points(
    tmp_path: Path, image_tree, models: list[str]
) -> None:
    """``train.py -m model=a,b seed=0,1`` on an image tree, then calibrate.py and infer.py
    over the same sweep: one interpreter per entry point for all the models.
    ``calibrate.output`` publishes each job's thresholds where infer.py looks for them (a
    sweep keeps per-run files only)."""
    tree = image_tree("train", "val")
    size = max(MIN_IMAGE_SIZE.get(_arch([f"model={m}"]), TOY_IMAGE_SIZE) for m in models)
    common = [
        f"model={','.join(models)}",
        "data=imagefolder",
        f"data.root={tree}",
        f"data.image_size={size}",
        "data.batch_size=4",
        "data.eval_batch_size=8",
        "data.num_workers=0",
        "data.pin_memory=false",
        "data.persistent_workers=false",
        "data.calib_fraction=0.25",
        f"paths.output_dir={tmp_path}",
        "logger=csv",
    ]
    train = run_script("train.py", "-m", *common, *TRAIN_TINY, "seed=0,1")
    assert train.stdout.count("member: ") == 2 * len(models), train.stdout
    run_script(
        "calibrate.py",
        "-m",
        *common,
        *CALIBRATE_TINY,
        "device=cpu",
        "calibrate.output=${paths.members_dir}/thresholds.json",
    )
    infer_run = run_script("infer.py", "-m", *common, *INFER_TINY, "device=cpu")
    assert infer_run.stdout.count("metrics: ") == len(models), infer_run.stdout
    for model in models:
        cfg = compose_cfg(
            "train", [f"model={model}", "data=imagefolder", f"paths.output_dir={tmp_path}"]
        )
        members_dir = Path(cfg.paths.members_dir)
        for seed in (0, 1):
            assert (
                load_member(members_dir / f"seed={seed}.safetensors").arch["arch"] == cfg.model.arch
            )
        report = json.loads((members_dir / "thresholds.json").read_text())
        assert [m["seed"] for m in report["members"]] == [0, 1]
        assert len(report["thresholds"]) == 1
    (sweep,) = (tmp_path / "multirun" / "infer").iterdir()
    for job in range(len(models)):
        metrics = json.loads((sweep / str(job) / "metrics.json").read_text())
        assert metrics["members"] == 2 and metrics["test_samples"] == EVAL_IMAGES
        assert sum(metrics["flexible"]["exit_histogram"]) == EVAL_IMAGES
        assert metrics["ensemble"] == f"imagefolder-{models[job]}"


# -- a heterogeneous ensemble of real architectures -----------------------------------------
HETERO = {0: "small_cnn", 1: "resnet18", 2: "alexnet"}


def test_heterogeneous_ensemble_of_real_architectures(tmp_path: Path, image_tree) -> None:
    """One members folder (``ensemble.name=hetero``), a different ``model=`` per seed;
    ``ensemble.order=auto`` runs the cheapest first; odd images in the wild are read."""
    tree = image_tree("train", "val")
    data = [*toy_data(["model=alexnet", "data=imagefolder"], image_tree), "data=imagefolder"]
    common = [*data, "ensemble.name=hetero", f"paths.output_dir={tmp_path}", "logger=csv"]
    for seed, model in HETERO.items():
        train_member(
            compose_cfg(
                "train",
                [
                    f"model={model}",
                    *common,
                    *TRAIN_TINY,
                    f"seed={seed}",
                    f"paths.run_dir={tmp_path}/t{seed}",
                ],
            )
        )
    members_dir = tmp_path / "members" / "hetero"
    assert sorted(p.name for p in members_dir.glob("seed=*.safetensors")) == [
        f"seed={s}.safetensors" for s in HETERO
    ]
    report = calibrate(
        compose_cfg(
            "calibrate",
            [
                *common,
                *CALIBRATE_TINY,
                "ensemble.order=auto",
                "device=cpu",
                f"paths.run_dir={tmp_path}/c",
            ],
        ),
        SweepMemo(),
    )
    profiled = report["latency_profile"]["members"]
    costs = [m["batch1_ms"] for m in profiled]
    assert costs == sorted(costs)  # cheapest first, and the members in that same order
    assert [m["sha256"] for m in report["members"]] == [m["sha256"] for m in profiled]
    assert sorted(m["arch"] for m in report["members"]) == sorted(HETERO.values())
    assert len(report["thresholds"]) == 2
    infer_common = [*common, *INFER_TINY, "device=cpu"]
    metrics = infer(compose_cfg("infer", [*infer_common, f"paths.run_dir={tmp_path}/i"]))
    assert metrics["members"] == 3 and metrics["full"]["avg_members"] == 3
    assert sum(metrics["flexible"]["exit_histogram"]) == metrics["test_samples"] == EVAL_IMAGES
    # the same members on the tree's images as files: every PIL mode in it decodes
    infer(compose_cfg("infer", [*infer_common, f"input={tree}/val", f"paths.run_dir={tmp_path}/w"]))
    rows = (tmp_path / "w" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + EVAL_IMAGES


# -- the README's "Scaling out" commands, as written, at toy scale --------------------------
def _bash_commands(markdown: Path, section: str | None = None) -> list[list[str]]:
    """The ``python train.py`` lines of a Markdown file's bash blocks (of one ``##`` section)."""
    text = markdown.read_text()
    if section is not None:
        text = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:2] == ["python", "train.py"]:
                commands.append(words[2:])
    return commands


README_COMMANDS = _bash_commands(ROOT / "README.md", "Scaling out")
JOBLIB_COMMANDS = [
    c for c in _bash_commands(ROOT / "docs" / "scaling_out.md") if "hydra/launcher=joblib" in c
]


def _override(args: list[str], key: str) -> str | None:
    values = [a.split("=", 1)[1] for a in args if a.split("=", 1)[0] == key]
    return values[-1] if values else None


def _toy_command(args: list[str], image_tree) -> list[str]:
    """The command as written, then overrides that make it tiny and runnable on a CPU
    (a later override of the same key wins in Hydra)."""
    toy = list(args)
    if _override(args, "seed"):
        toy.append("seed=0,1")
    if _override(args, "hydra.launcher.n_jobs"):
        toy.append("hydra.launcher.n_jobs=2")
    if _override(args, "trainer") in ("gpu", "ddp"):
        toy.append("trainer.accelerator=cpu")
    if _override(args, "trainer") == "ddp":
        toy.append("trainer.devices=2")
    selection = [a for a in args if a.split("=", 1)[0] in ("experiment", "model", "data")]
    return [*toy, *toy_data(selection, image_tree), *TRAIN_TINY, "logger=csv"]


def _readme_params() -> list:
    params = []
    for args in README_COMMANDS + JOBLIB_COMMANDS:
        launcher = _override(args, "hydra/launcher") or "basic"
        trainer = _override(args, "trainer") or "default"
        marks = [] if launcher == "submitit_slurm" else [pytest.mark.slow]
        params.append(pytest.param(args, marks=marks, id=f"{launcher}-{trainer}"))
    return params


def test_the_readme_scaling_out_commands_are_found() -> None:
    launchers = {_override(c, "hydra/launcher") for c in README_COMMANDS + JOBLIB_COMMANDS}
    assert {None, "submitit_slurm", "joblib"} <= launchers
    assert {"gpu", "ddp"} <= {_override(c, "trainer") for c in README_COMMANDS}


@pytest.mark.parametrize("args", _readme_params())
def test_readme_scaling_out_command(
    tmp_path: Path, image_tree, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    assert args[0] == "-m"  # a sweep of members: Hydra uses a launcher only in multirun mode
    if _override(args, "hydra/launcher") == "submitit_slurm":
        # resolve the launcher config only: instantiating the launcher submits nothing
        for key in ("SLURM_NNODES", "SLURM_NTASKS_PER_NODE"):
            monkeypatch.delenv(key, raising=False)
        one_job = [a for a in args[1:] if not a.startswith("seed=")]
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=[*one_job, "seed=0"], return_hydra_config=True)
        launcher = instantiate(cfg.hydra.launcher)
        assert type(launcher).__name__ == "SlurmLauncher"
        params = launcher.params
        for key in ("partition", "gpus_per_node", "timeout_min", "nodes"):
            if _override(args, f"hydra.launcher.{key}") is not None:
                assert str(params[key]) == _override(args, f"hydra.launcher.{key}")
        assert params["tasks_per_node"] == params["gpus_per_node"]  # one DDP rank per GPU
        trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
        assert trainer["strategy"] == "ddp" and trainer["precision"] == cfg.trainer.precision
        assert cfg.data.batch_size == int(_override(args, "data.batch_size"))
        return

    toy = _toy_command(args, image_tree)
    result = run_script("train.py", *toy, f"paths.output_dir={tmp_path}")
    one_job = [a for a in toy[1:] if not a.startswith("seed=")]
    cfg = compose_cfg("train", [*one_job, "seed=0", f"paths.output_dir={tmp_path}"])
    members_dir = Path(cfg.paths.members_dir)
    for seed in (0, 1):
        member = load_member(members_dir / f"seed={seed}.safetensors")
        assert member.arch["arch"] == cfg.model.arch
        recipe = member.meta["recipe"]
        assert recipe["trainer"]["precision"] == cfg.trainer.precision
        assert recipe["train"]["channels_last"] == cfg.train.channels_last
    output = result.stdout + result.stderr
    if cfg.trainer.get("strategy") == "ddp":
        assert output.count("Starting with 2 processes") == 2
    if _override(args, "hydra/launcher") == "joblib":
        assert "Joblib.Parallel(n_jobs=2," in output
