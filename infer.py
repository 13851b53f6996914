"""Flexible inference: ``python infer.py`` (test split) or ``python infer.py input=img_or_dir``."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("FLEXENS_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="infer")
def main(cfg: DictConfig) -> None:
    from flexens.cli import run

    run("infer", cfg)


if __name__ == "__main__":
    main()
