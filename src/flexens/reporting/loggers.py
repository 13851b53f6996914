"""Experiment loggers for the three entry points, built from the ``logger`` config group.

W&B runs offline unless told otherwise, so nothing ever waits on a server. Multirun jobs
share a W&B group named after the sweep, so a seed or λ sweep reads as one unit.
"""

from __future__ import annotations

import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger


def run_dir(cfg: DictConfig) -> Path:
    """This job's output folder: ``paths.run_dir`` if set, else Hydra's, else the cwd."""
    if cfg.paths.get("run_dir"):
        path = Path(cfg.paths.run_dir)
    elif HydraConfig.initialized():
        path = Path(HydraConfig.get().runtime.output_dir)
    else:
        path = Path.cwd()
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_group(cfg: DictConfig) -> str:
    """``<ensemble>`` for single runs, ``<ensemble>-<task>-<sweep folder>`` inside a sweep."""
    group = str(cfg.ensemble.name)
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        group += f"-{cfg.task_name}-{Path(HydraConfig.get().sweep.dir).name}"
    return group


def build_logger(cfg: DictConfig, run_dir: str | Path, name: str) -> Logger | None:
    if cfg.get("logger") is None:
        return None
    logger_cfg = OmegaConf.to_container(cfg.logger, resolve=True)
    target = str(logger_cfg.get("_target_", ""))
    if target.endswith("WandbLogger"):
        os.environ.setdefault("WANDB_SILENT", "true")
        if logger_cfg.get("offline", True):
            os.environ["WANDB_MODE"] = "offline"
        logger_cfg.update(
            save_dir=str(run_dir), group=run_group(cfg), name=name, job_type=str(cfg.task_name)
        )
    else:
        logger_cfg.update(save_dir=str(run_dir), name=name)
    return instantiate(logger_cfg)


def log_config(logger: Logger | None, cfg: DictConfig) -> None:
    if logger is not None:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))


def log_images(logger: Logger | None, images: dict[str, Path]) -> None:
    """PNG files as W&B images; other loggers already have them in the run directory."""
    if isinstance(logger, WandbLogger) and images:
        for key, path in images.items():
            logger.log_image(key=key, images=[str(path)])


def log_table(logger: Logger | None, key: str, columns: list[str], rows: list[list]) -> None:
    if isinstance(logger, WandbLogger):
        logger.log_table(key=key, columns=columns, data=rows)


def close_logger(logger: Logger | None) -> None:
    """Finish the run so the next job of a multirun (same process) starts a fresh one."""
    if logger is None:
        return
    logger.finalize("success")
    if isinstance(logger, WandbLogger):
        import wandb

        wandb.finish()
    elif isinstance(logger, CSVLogger):
        logger.save()
