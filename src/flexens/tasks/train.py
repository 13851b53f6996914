"""Train one ensemble member per run; ``train.py -m seed=0,1,2`` trains an ensemble."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, RichProgressBar

from flexens.artifacts import fingerprint, write_text
from flexens.data.base import epoch_seed
from flexens.members.module import MemberModule
from flexens.members.record import OLD_SUFFIX, convert_command
from flexens.members.registry import (
    load_member,
    member_path,
    publish_member,
    record_path,
    weights_bytes,
)
from flexens.reporting.loggers import open_logger, run_dir
from flexens.tasks.distributed import ddp_member_scope

log = logging.getLogger(__name__)


SET_BY_FLEXENS = ("arch", "num_classes", "in_chans", "pretrained")
"""Keys of the architecture spec that come from elsewhere than ``model.kwargs``."""


def member_arch(cfg: DictConfig, num_classes: int, in_chans: int) -> dict:
    """The architecture spec stored with the member, enough to rebuild it anywhere."""
    kwargs = cfg.model.get("kwargs")
    if kwargs is None:
        kwargs = {}
    elif OmegaConf.is_dict(kwargs):  # an empty DictConfig is falsy: test it by type, not truth
        kwargs = OmegaConf.to_container(kwargs, resolve=True)
    else:
        raise ValueError(
            f"model.kwargs must map constructor arguments to values, got {kwargs!r}; "
            "e.g. +model.kwargs.drop_rate=0.1"
        )
    taken = [k for k in SET_BY_FLEXENS if k in kwargs]
    if taken:
        raise ValueError(
            f"model.kwargs.{taken[0]} is set by flexens (model.arch, model.pretrained, and the "
            f"data's classes and channels); remove model.kwargs.{taken[0]}"
        )
    return {
        "arch": str(cfg.model.arch),
        "num_classes": num_classes,
        "in_chans": in_chans,
        "pretrained": cfg.model.get("pretrained"),
        **kwargs,
    }


def training_recipe(cfg: DictConfig) -> dict:
    """What determines a member besides its seed: a rerun with another recipe retrains."""
    full = OmegaConf.to_container(cfg, resolve=True)
    recipe = {k: full[k] for k in ("model", "train", "trainer")}
    for section, key in (
        ("train", "progress_bar"),
        ("train", "force"),
        ("trainer", "default_root_dir"),
    ):
        recipe[section].pop(key, None)
    recipe["data"] = {
        k: v
        for k, v in full["data"].items()
        if k not in ("root", "cache_dir", "num_workers", "eval_batch_size")
    }
    return recipe


def _warn(message: str) -> None:
    log.warning(message)
    print(f"warning: {message}")


def unreadable_checkpoint(path: Path) -> str | None:
    """Why Lightning could not resume from ``path``, or None when it loads as a checkpoint.

    Loaded as Lightning loads it (``weights_only``: tensors and plain data, no code).
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, empty, garbage: whatever torch says about it
        lines = str(err).strip().splitlines()
        return f"{type(err).__name__}: {lines[0] if lines else ''}"
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        return "not a Lightning checkpoint"
    return None


def resumable_checkpoint(work_dir: Path, recipe_id: str, force: bool) -> Path | None:
    """``last.ckpt`` of an interrupted run of the same recipe; anything else starts afresh.

    An unreadable ``last.ckpt`` is set aside beside the work folder
    (``.work/seed=<n>.last.ckpt.corrupt``) and the member starts from scratch.
    """
    stamp = work_dir / "recipe.txt"
    last = work_dir / "last.ckpt"
    if last.exists() and not force and stamp.exists() and stamp.read_text() == recipe_id:
        problem = unreadable_checkpoint(last)
        if problem is None:
            log.info("resuming from %s", last)
            print(f"resuming from {last}")
            return last
        aside = work_dir.parent / f"{work_dir.name}.last.ckpt.corrupt"
        os.replace(last, aside)
        _warn(
            f"the resume checkpoint {last} is unreadable ({problem}); set it aside as "
            f"{aside} and training from scratch"
        )
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    write_text(stamp, recipe_id)
    return None


def remove_work_dir(work_dir: Path) -> None:
    """Drop a member's resume folder, and ``.work/`` itself once no member uses it."""
    shutil.rmtree(work_dir, ignore_errors=True)
    # not while another member's folder (a concurrent run) or a set-aside checkpoint is there
    with contextlib.suppress(OSError):
        work_dir.parent.rmdir()


class EpochSeeds(Callback):
    """Reseed torch, numpy and ``random`` from (seed, epoch) at the start of every epoch.

    Dropout and augmentation then draw the same numbers in epoch e whether the run got
    there in one go or resumed from a checkpoint (which does not hold the RNG states), so
    a resumed member is bit-identical to an uninterrupted one. Worker processes are seeded
    from the global RNG when an epoch's iterator is made, so they follow along, except
    persistent workers (``data.persistent_workers=true``), which keep their own streams.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seed = epoch_seed(self.seed, trainer.current_epoch)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # CUDA generators too


def refuse_untrained(cfg: DictConfig) -> None:
    """A run that cannot take a training step would publish random weights: refuse it."""
    for key in ("max_epochs", "max_steps"):
        if cfg.trainer.get(key) == 0:
            raise ValueError(
                f"trainer.{key}=0 would publish an untrained member; train at least one "
                f"{key.removeprefix('max_')[:-1]} (e.g. trainer.{key}=1)"
            )


def recipe_differences(old, new, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two recipes (nested dicts compared per key)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(old) + [k for k in new if k not in old]
        return [
            d
            for k in keys
            for d in recipe_differences(old.get(k, _UNSET), new.get(k, _UNSET), f"{prefix}{k}.")
        ]
    return [] if old == new else [prefix.rstrip(".")]


_UNSET = object()


def _show(recipe: dict, key: str) -> str:
    value = recipe
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return "unset"
        value = value[part]
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def finished_member(out: Path, recipe: dict, seed: int) -> bool:
    """Whether ``out`` is a complete, valid member of this recipe (then training skips it).

    A member without a valid record (interrupted, damaged) is unfinished: a warning, and it
    is retrained. A finished member of another recipe is a one-line error, never kept
    silently under the new settings.
    """
    if not out.exists() and out.with_suffix(OLD_SUFFIX).exists():
        old = out.with_suffix(OLD_SUFFIX)
        raise ValueError(
            f"{old} is an old pickled member, which flexens never loads; convert it "
            f"({convert_command(out.parent)}) or retrain it: train.force=true"
        )
    if not out.exists() and not record_path(out).exists():
        return False
    try:
        member = load_member(out)
    except (ValueError, FileNotFoundError) as err:
        _warn(f"{out.name} is not a finished member ({err.args[0]}); retraining it")
        return False
    stored = member.meta.get("recipe")
    if stored is None:
        raise ValueError(
            f"{out} records no training recipe (converted from an old checkpoint), so this run "
            "cannot tell whether it matches; retrain it: train.force=true, or train another "
            "ensemble: ensemble.name=<new name>"
        )
    differing = recipe_differences(stored, json.loads(json.dumps(recipe)))
    if differing:
        shown = ", ".join(
            f"{k}: {_show(stored, k)} -> {_show(recipe, k)}" for k in differing[:4]
        ) + (f" and {len(differing) - 4} more" if len(differing) > 4 else "")
        raise ValueError(
            f"seed={seed} is already trained in {out.parent} with another recipe ({shown}); "
            "retrain it with train.force=true, or train a separate ensemble: "
            "ensemble.name=<new name>"
        )
    return True


def member_seed(value) -> int:
    """``seed`` as a whole number >= 0 (seeds start at 0), or a one-line error."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"seed must be a whole number >= 0, got {value!r}; e.g. seed=0")
    return value


def train_member(cfg: DictConfig) -> Path:
    """Train, check and publish one member, unless an identical one is already finished."""
    seed = member_seed(cfg.seed)
    out = member_path(cfg.paths.members_dir, seed)
    refuse_untrained(cfg)
    if cfg.model.name != cfg.model.arch:  # a label is easy to mistake for the architecture
        print(
            f"note: model.name={cfg.model.name} only names the ensemble ({cfg.ensemble.name}); "
            f"the network is model.arch={cfg.model.arch} (pick one with model=<config> or "
            "model.arch=<timm or torchvision name>)"
        )
    recipe = training_recipe(cfg)
    if not cfg.train.force and finished_member(out, recipe, seed):
        log.info("member %s already trained; skipping (train.force=true retrains it)", out)
        print(f"skipped (exists): {out}")
        return out
    with open_logger(cfg, run_dir(cfg), f"{cfg.ensemble.name}-seed{seed}") as logger:
        fit_and_publish(cfg, seed, recipe, out, logger)
    return out


def member_module(cfg: DictConfig, arch: dict) -> MemberModule:
    return MemberModule(
        arch=arch,
        optimizer=instantiate(cfg.train.optimizer),
        scheduler=cfg.train.scheduler,
        label_smoothing=cfg.train.label_smoothing,
        channels_last=cfg.train.channels_last,
        compile=cfg.train.compile,
    )


def final_accuracy(trainer: L.Trainer, module: MemberModule, datamodule) -> float:
    """Calibration-split accuracy of the final weights (NaN without a validation split).

    A run resumed from the checkpoint of its last epoch (killed while publishing) trains
    nothing and so measures nothing: it validates once, so its record says what an
    uninterrupted run's says.
    """
    if "val/acc" not in trainer.callback_metrics:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    return float(trainer.callback_metrics.get("val/acc", float("nan")))


def fit_and_publish(cfg: DictConfig, seed: int, recipe: dict, out: Path, logger) -> None:
    """Fit (resuming an interrupted run of the same recipe); publish only a sound member."""
    L.seed_everything(seed, workers=True)
    datamodule = instantiate(cfg.data, shuffle_seed=seed)
    datamodule.setup()
    arch = member_arch(cfg, datamodule.num_classes, datamodule.in_chans)
    module = member_module(cfg, arch)
    work_dir = Path(cfg.paths.members_dir) / ".work" / f"seed={seed}"
    resume = resumable_checkpoint(work_dir, fingerprint([recipe]), bool(cfg.train.force))
    callbacks = [
        ModelCheckpoint(dirpath=work_dir, save_last=True, save_top_k=1, monitor=None),
        EpochSeeds(seed),
    ]
    if cfg.train.progress_bar:
        callbacks.append(RichProgressBar())
    trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=logger or False,
        enable_progress_bar=bool(cfg.train.progress_bar),
    )
    start = time.perf_counter()
    with ddp_member_scope(trainer):
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    train_time = time.perf_counter() - start
    if trainer.global_step == 0:
        remove_work_dir(work_dir)
        raise ValueError(
            f"seed={seed} took no training step (check trainer.limit_train_batches, "
            "trainer.max_steps and the training split); no member written"
        )
    val_acc = final_accuracy(trainer, module, datamodule)
    if not trainer.is_global_zero:
        return
    meta = {
        "seed": seed,
        "ensemble": str(cfg.ensemble.name),
        "data": datamodule.describe(),
        "num_classes": datamodule.num_classes,
        "class_names": [str(c) for c in datamodule.class_names],
        "calib_fingerprint": datamodule.calib_fingerprint(),
        "val_acc": val_acc if math.isfinite(val_acc) else None,
        "epochs": int(trainer.current_epoch),
        "train_time_s": round(train_time, 2),
        "recipe": recipe,
        "recipe_fingerprint": fingerprint([recipe]),
    }
    try:
        weights = weights_bytes(module.net.state_dict(), out.name)
    except ValueError:
        remove_work_dir(work_dir)  # resuming would only diverge again
        raise
    publish_member(out, weights, arch, meta)
    remove_work_dir(work_dir)
    accuracy = "n/a" if meta["val_acc"] is None else f"{meta['val_acc']:.4f}"
    print(f"member: {out} (calibration-split accuracy {accuracy}, {train_time:.1f} s)")
