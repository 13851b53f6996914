"""Train one ensemble member per run; ``train.py -m seed=0,1,2`` trains an ensemble."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import pytorch_lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint, RichProgressBar

from flexens.artifacts import fingerprint, write_text
from flexens.members.distributed import ddp_member_scope
from flexens.members.module import MemberModule
from flexens.members.registry import member_path, save_member
from flexens.reporting.loggers import build_logger, close_logger, log_config, run_dir

log = logging.getLogger(__name__)


def member_arch(cfg: DictConfig, num_classes: int, in_chans: int) -> dict:
    """The architecture spec stored with the member, enough to rebuild it anywhere."""
    kwargs = OmegaConf.to_container(cfg.model.get("kwargs") or {}, resolve=True)
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


def resumable_checkpoint(work_dir: Path, recipe_id: str, force: bool) -> Path | None:
    """``last.ckpt`` of an interrupted run of the same recipe; anything else starts afresh."""
    stamp = work_dir / "recipe.txt"
    last = work_dir / "last.ckpt"
    if last.exists() and not force and stamp.exists() and stamp.read_text() == recipe_id:
        log.info("resuming from %s", last)
        print(f"resuming from {last}")
        return last
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    write_text(stamp, recipe_id)
    return None


def train_member(cfg: DictConfig) -> Path:
    seed = int(cfg.seed)
    out = member_path(cfg.paths.members_dir, seed)
    if out.exists() and not cfg.train.force:
        log.info("member %s already trained; skipping (train.force=true retrains it)", out)
        print(f"skipped (exists): {out}")
        return out
    L.seed_everything(seed, workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    arch = member_arch(cfg, datamodule.num_classes, datamodule.in_chans)
    module = MemberModule(
        arch=arch,
        optimizer=instantiate(cfg.train.optimizer),
        scheduler=cfg.train.scheduler,
        label_smoothing=cfg.train.label_smoothing,
        channels_last=cfg.train.channels_last,
        compile=cfg.train.compile,
    )
    recipe = training_recipe(cfg)
    work_dir = Path(cfg.paths.members_dir) / ".work" / f"seed={seed}"
    resume = resumable_checkpoint(work_dir, fingerprint([recipe]), bool(cfg.train.force))
    callbacks = [ModelCheckpoint(dirpath=work_dir, save_last=True, save_top_k=1, monitor=None)]
    if cfg.train.progress_bar:
        callbacks.append(RichProgressBar())
    logger = build_logger(cfg, run_dir(cfg), name=f"{cfg.ensemble.name}-seed{seed}")
    log_config(logger, cfg)
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
    if trainer.is_global_zero:
        meta = {
            "seed": seed,
            "ensemble": str(cfg.ensemble.name),
            "data": datamodule.describe(),
            "num_classes": datamodule.num_classes,
            "class_names": datamodule.class_names,
            "calib_fingerprint": datamodule.calib_fingerprint(),
            "val_acc": float(trainer.callback_metrics.get("val/acc", float("nan"))),
            "epochs": int(trainer.current_epoch),
            "train_time_s": round(train_time, 2),
            "recipe": recipe,
            "recipe_fingerprint": fingerprint([recipe]),
        }
        save_member(out, module.net, arch, meta)
        shutil.rmtree(work_dir, ignore_errors=True)
        print(
            f"member: {out} (calibration-split accuracy {meta['val_acc']:.4f}, {train_time:.1f} s)"
        )
    close_logger(logger)
    return out
