"""Lightning's DDP process launcher inside Hydra runs and sweeps.

Lightning starts ranks > 0 by re-running ``sys.argv`` (plus ``hydra.run.dir=<run.dir>``).
Inside a sweep (``-m seed=0,1``) that command line is the whole sweep: every child would
start its own multirun, with the parent's launcher (joblib: several jobs at once), and join
the process groups of whichever members it happens to reach. And Lightning launches once
per process: it leaves ``LOCAL_RANK``/``MASTER_PORT`` set and the process group open, so the
next member of a sweep would wait for ranks that already exited.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytorch_lightning as L
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import read_write
from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher

_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextmanager
def ddp_member_scope(trainer: L.Trainer) -> Iterator[None]:
    """Wrap ``trainer.fit`` so the DDP ranks Lightning starts train this job's member only.

    A no-op unless Lightning itself starts the other ranks: not for one process, and not
    where they come from outside (SLURM, torchrun, or this process being a child rank).
    """
    if not _starts_ranks_itself(trainer):
        yield
        return
    argv, env = list(sys.argv), {k: os.environ.get(k) for k in _LAUNCH_ENV}
    _pin_children_to_job()
    try:
        yield
    finally:
        sys.argv = argv
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _starts_ranks_itself(trainer: L.Trainer) -> bool:
    launcher = getattr(trainer.strategy, "launcher", None)
    cluster = getattr(trainer.strategy, "cluster_environment", None)
    return (
        isinstance(launcher, _SubprocessScriptLauncher)
        and cluster is not None
        and not cluster.creates_processes_externally
    )


def _pin_children_to_job() -> None:
    """In a multirun, make the children's command line this job's overrides and folder."""
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
