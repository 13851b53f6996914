"""Experiment loggers for the three entry points, built from the ``logger`` config group.

W&B runs offline unless told otherwise, so nothing ever waits on a server. Multirun jobs
share a W&B group named after the sweep, so a seed or λ sweep reads as one unit.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

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


REACH_TIMEOUT_S = 5.0
"""How long an online W&B run may wait for its server before flexens logs offline."""


def wandb_host() -> tuple[str, int]:
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    return url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)


def wandb_reachable() -> bool:
    """Whether a TCP connection to the W&B server opens in time (no run ever waits longer)."""
    try:
        socket.create_connection(wandb_host(), timeout=REACH_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def build_logger(cfg: DictConfig, run_dir: str | Path, name: str) -> Logger | None:
    if cfg.get("logger") is None:
        return None
    logger_cfg = OmegaConf.to_container(cfg.logger, resolve=True)
    target = str(logger_cfg.get("_target_", ""))
    if target.endswith("WandbLogger"):
        os.environ.setdefault("WANDB_SILENT", "true")
        if not logger_cfg.get("offline", True) and not wandb_reachable():
            host, port = wandb_host()
            print(
                f"warning: the W&B server {host}:{port} is not reachable within "
                f"{REACH_TIMEOUT_S:g} s; logging offline instead (sync later with `wandb sync`)"
            )
            logger_cfg["offline"] = True
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


@contextmanager
def open_logger(cfg: DictConfig, run: Path, name: str) -> Iterator[Logger | None]:
    """The task wrapper of every entry point: a logger with the job's config, finished in
    ``finally`` and marked failed when the job raised, so no run is left open."""
    logger = build_logger(cfg, run, name=name)
    status = "failed"
    try:
        log_config(logger, cfg)
        yield logger
        status = "success"
    finally:
        close_logger(logger, status)


def close_logger(logger: Logger | None, status: str = "success") -> None:
    """Finish the run, marked ``success`` or ``failed``, so the next job of a multirun (same
    process) starts a fresh one and never logs into this one."""
    if logger is None:
        return
    logger.finalize(status)
    if isinstance(logger, WandbLogger):
        import wandb

        wandb.finish(exit_code=0 if status == "success" else 1)
    elif isinstance(logger, CSVLogger):
        logger.save()
