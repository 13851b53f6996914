"""What the thin ``@hydra.main`` entry points call: dispatch, and one-line user errors.

A user error ends a single run with ``error: <one line>`` and exit code 2. Inside a sweep
(``-m``) it ends only its own job: the job is recorded as failed in the sweep folder, the
other jobs run on, and :class:`SweepFailures` (a Hydra callback) prints which jobs failed
once the sweep is over and exits with code 2. The record is a file, not process memory,
so it works for every launcher (joblib and SLURM jobs run in other processes).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from flexens.allocator import retain_freed_memory
from flexens.artifacts import write_text
from flexens.memo import SweepMemo

USER_ERRORS = (ValueError, FileNotFoundError, ConnectionError)
FAILED_JOBS = ".failed_jobs"
"""Folder of the sweep directory holding one ``<job number>.txt`` per failed job."""
LIGHTNING_LEAFSPEC = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
"""Lightning 2.6 flattens every batch with torch's ``LeafSpec``, which this torch deprecates:
a FutureWarning in every run that no flexens user can act on
(Lightning-AI/pytorch-lightning#21326). Silenced for the task, nothing else."""


def run(task: str, cfg: DictConfig, memo: SweepMemo | None = None) -> None:
    """Run ``task``; bad input ends with ``error: <one line>`` (exit 2, or a failed job).

    ``memo`` is what the jobs of a sweep in this process share (the entry point owns it).
    Freed memory stays in the process (:mod:`flexens.allocator`): a large batch then costs
    no page faults, in training, profiling and inference alike.
    """
    retain_freed_memory()
    try:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", LIGHTNING_LEAFSPEC, FutureWarning)
                dispatch(task, cfg, memo or SweepMemo())
        except InstantiationException as err:  # a typed config object refused a value
            if isinstance(err.__cause__, USER_ERRORS):
                raise err.__cause__ from None
            raise
    except USER_ERRORS as err:
        message = " ".join(str(err.args[0] if err.args else repr(err)).split())
        print(f"error: {message}", file=sys.stderr)
        if not in_sweep():
            sys.exit(2)
        job = HydraConfig.get().job
        overrides = " ".join(HydraConfig.get().overrides.task)
        folder = Path(HydraConfig.get().sweep.dir) / FAILED_JOBS
        write_text(folder / f"{job.num}.txt", f"#{job.num} ({overrides}): {message}\n")


def dispatch(task: str, cfg: DictConfig, memo: SweepMemo) -> None:
    if task == "train":
        from flexens.tasks.train import train_member

        train_member(cfg)
    elif task == "calibrate":
        from flexens.tasks.calibrate import calibrate

        calibrate(cfg, memo)
    elif task == "infer":
        from flexens.tasks.infer import infer

        infer(cfg)
    elif task == "serve":
        from flexens.tasks.serve import serve

        serve(cfg)
    else:
        raise ValueError(f"unknown task {task!r}")


def in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


class SweepFailures(Callback):
    """At the end of a sweep: one line naming the failed jobs, then exit code 2 if any failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        folder = Path(config.hydra.sweep.dir) / FAILED_JOBS
        failed = sorted(folder.glob("*.txt"), key=lambda p: int(p.stem)) if folder.is_dir() else []
        if not failed:
            return
        jobs = ", ".join(p.read_text().split(":", 1)[0] for p in failed)
        print(
            f"error: {len(failed)} job(s) of this sweep failed, the others ran: {jobs} "
            f"(their errors are above and in {folder})",
            file=sys.stderr,
        )
        sys.exit(2)
