"""Serve the calibrated ensemble over HTTP: ``python serve.py`` (POST /predict, /health, /metrics)."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("FLEXENS_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    from flexens.cli import run

    run("serve", cfg)


if __name__ == "__main__":
    main()
