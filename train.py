"""Train one ensemble member: ``python train.py seed=0`` (``-m seed=0,1,2`` for an ensemble)."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("FLEXENS_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from flexens.cli import run

    run("train", cfg)


if __name__ == "__main__":
    main()
