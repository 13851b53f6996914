"""``calibrate.py``: cached member outputs on the calibration split → thresholds.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from flexens.artifacts import write_json
from flexens.calibration.loading import (
    CalibrationInputs,
    EnsembleFiles,
    read_inputs,
)
from flexens.calibration.run import build_report, log_report, make_plots, print_summary
from flexens.calibration.settings import CalibrateSettings
from flexens.latency import resolve_device
from flexens.members.registry import find_member_paths
from flexens.memo import SweepMemo
from flexens.reporting.loggers import open_logger, run_dir


def calibrate(cfg: DictConfig, memo: SweepMemo) -> dict:
    """Read (or reuse) the inputs, choose and certify thresholds, publish thresholds.json."""
    settings: CalibrateSettings = instantiate(cfg.calibrate)
    device = resolve_device(cfg.device)
    files = ensemble_files(cfg)
    inputs = calibration_inputs(cfg, settings, files, device, memo)
    run = run_dir(cfg)
    name = f"{cfg.ensemble.name}-calibrate-{settings.objective}"
    with open_logger(cfg, run, name) as logger:
        report = build_report(settings, inputs, str(cfg.ensemble.name), memo)
        images = make_plots(run, inputs.table, report, memo)
        path = write_json(run / "thresholds.json", report)
        published = output_path(settings, files, run)
        if published is not None:
            path = write_json(published, report)
        print_summary(report, path)
        log_report(logger, report, images)
    return report


def ensemble_files(cfg: DictConfig) -> EnsembleFiles:
    order = cfg.ensemble.order
    if OmegaConf.is_config(order):
        order = OmegaConf.to_container(order)
    return EnsembleFiles(Path(cfg.paths.members_dir), Path(cfg.paths.cache_dir), order)


def calibration_inputs(
    cfg: DictConfig,
    settings: CalibrateSettings,
    files: EnsembleFiles,
    device: torch.device,
    memo: SweepMemo,
) -> CalibrationInputs:
    """The inputs, or the previous job's when nothing that shapes them changed.

    The key is taken after reading, so a profile this job measured and stored is part of it
    and the next job of a sweep reuses it instead of measuring again: all runs of one sweep
    share one latency profile, which keeps their expected latencies comparable.
    """
    cached = memo.inputs.get(inputs_key(cfg, files, device))
    if cached is not None:
        return cached
    memo.inputs.make_room()  # let the old inputs go before the new ones are read
    inputs = read_inputs(settings, files, instantiate(cfg.data), device)
    return memo.inputs.put(inputs_key(cfg, files, device), inputs)


def inputs_key(cfg: DictConfig, files: EnsembleFiles, device: torch.device) -> str:
    """Every setting that shapes the inputs, and the state of every file they come from."""
    c = cfg.calibrate
    paths = [*find_member_paths(files.members_dir, files.explicit_order)]
    paths.append(Path(c.latency_profile) if c.latency_profile else files.stored_profile(device))
    settings = {
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "files": [str(files.members_dir), str(files.cache_dir), files.order],
        "device": str(device),
        **{k: c[k] for k in ("criterion", "latency_profile", "reprofile", "profile_batch_size")},
        "unlabelled": c.unlabelled,
        "states": [_file_state(p) for p in paths],
    }
    return json.dumps(settings, sort_keys=True, default=str)


def _file_state(path: Path) -> tuple:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return (str(path), None)
    return (str(path), stat.st_size, stat.st_mtime_ns)


def output_path(settings: CalibrateSettings, files: EnsembleFiles, run: Path) -> Path | None:
    """Where thresholds.json is published for infer.py; a sweep keeps per-run files only."""
    if settings.output:
        return Path(settings.output)
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return None
    return files.members_dir / "thresholds.json"
