"""``serve.py``: the calibrated ensemble behind an HTTP endpoint (LitServe)."""

from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from flexens.serving.app import serve as run_server
from flexens.serving.settings import read_settings


def serve(cfg: DictConfig) -> None:
    settings = read_settings(
        OmegaConf.to_container(cfg.serve, resolve=True),
        Path(cfg.paths.members_dir),
        str(cfg.device),
    )
    run_server(settings, instantiate(cfg.data).image_transform())
