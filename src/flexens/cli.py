"""What the thin ``@hydra.main`` entry points call: dispatch, and one-line user errors."""

from __future__ import annotations

import sys

from omegaconf import DictConfig

USER_ERRORS = (ValueError, FileNotFoundError, ConnectionError)


def run(task: str, cfg: DictConfig) -> None:
    """Run ``task``; bad input ends with ``error: <one line>`` and exit code 2."""
    try:
        if task == "train":
            from flexens.members.train import train_member

            train_member(cfg)
        elif task == "calibrate":
            from flexens.calibration.run import calibrate

            calibrate(cfg)
        elif task == "infer":
            from flexens.inference import infer

            infer(cfg)
        else:
            raise ValueError(f"unknown task {task!r}")
    except USER_ERRORS as err:
        message = err.args[0] if err.args else repr(err)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
