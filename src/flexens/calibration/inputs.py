"""What a calibration reads before it searches: members, latency profile, member outputs.

Reading is the slow part of a calibration (checkpoints, the data module, the logit cache),
and it is the same for every job of a λ sweep, which Hydra's basic launcher runs one after
another in one process. So the inputs of the last calibration stay in memory, keyed by every
setting that shapes them and by the size and modification time of every file they were read
from; the next job that asks for the same inputs gets them without touching the disk, and a
retrained member, a new profile or another setting reads everything anew.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from flexens.artifacts import read_json, write_json
from flexens.calibration.cache import ensemble_probs
from flexens.calibration.simulate import StageTable
from flexens.halting import get_criterion
from flexens.latency import latency_profile, resolve_device, stage_costs_ms
from flexens.members.registry import Member, find_member_paths, load_ensemble


@dataclass(frozen=True)
class CalibrationInputs:
    """Members in calibration order and everything simulated from their cached outputs."""

    members: list[Member]
    calib_fingerprint: str
    profile: dict
    table: StageTable
    derived: dict = field(default_factory=dict, compare=False, repr=False)
    """Results computed from these inputs alone (the λ curve): jobs that share the inputs
    share these too."""


def explicit_order(cfg: DictConfig) -> list | None:
    """``ensemble.order`` as a list of seeds/paths, or None for seed order and ``auto``."""
    order = cfg.ensemble.order
    if order in (None, "auto"):
        return None
    return list(OmegaConf.to_container(order) if OmegaConf.is_config(order) else order)


def prepare_ensemble(cfg: DictConfig) -> tuple[list[Member], object]:
    """Members in configured order and the data module, checked against each other."""
    members = load_ensemble(cfg.paths.members_dir, explicit_order(cfg))
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    calib_fp = datamodule.calib_fingerprint()
    for m in members:
        if m.meta.get("calib_fingerprint") != calib_fp:
            raise ValueError(
                f"member {m.path.name} was trained with another calibration split than data="
                f"{datamodule.name} gives now; use the same data.* settings or retrain"
            )
        if m.num_classes != datamodule.num_classes:
            raise ValueError(
                f"member {m.path.name} has {m.num_classes} classes, the data has "
                f"{datamodule.num_classes}; pick the matching data="
            )
    return members, datamodule


def stored_profile_path(cfg: DictConfig, device) -> Path:
    return Path(cfg.paths.members_dir) / f"latency_profile-{device.type}.json"


def load_or_measure_profile(cfg: DictConfig, members: list[Member], datamodule, device) -> dict:
    """A profile given by ``calibrate.latency_profile``, a matching stored one, or a fresh one."""
    hashes = [m.sha256 for m in members]
    given = cfg.calibrate.latency_profile
    stored = stored_profile_path(cfg, device)
    path = Path(given) if given else stored
    if path.exists() and (given or not cfg.calibrate.reprofile):
        profile = read_json(path)
        by_hash = {m["sha256"]: m for m in profile["members"]}
        if set(hashes) <= set(by_hash):
            return {**profile, "members": [by_hash[h] for h in hashes], "source": str(path)}
        if given:
            raise ValueError(
                f"latency profile {str(path)!r} was measured for other members; "
                "measure one for these checkpoints or drop calibrate.latency_profile"
            )
    example = datamodule.calib_set[0][0].unsqueeze(0)
    profile = latency_profile(
        [m.network for m in members],
        hashes,
        example,
        int(cfg.calibrate.profile_batch_size),
        device,
        get_criterion(cfg.calibrate.criterion),
        members[0].num_classes,
    )
    write_json(stored, profile)
    return {**profile, "source": "measured"}


def read_inputs(cfg: DictConfig) -> CalibrationInputs:
    """Load members, profile them (or read their profile) and simulate their cached outputs."""
    members, datamodule = prepare_ensemble(cfg)
    device = resolve_device(cfg.device)
    profile = load_or_measure_profile(cfg, members, datamodule, device)
    if cfg.ensemble.order == "auto":
        order = np.argsort([m["batch1_ms"] for m in profile["members"]], kind="stable")
        members = [members[i] for i in order]
        profile = {**profile, "members": [profile["members"][i] for i in order]}
    calib_fp = datamodule.calib_fingerprint()
    probs, labels = ensemble_probs(
        members,
        datamodule.calib_dataloader(),
        device,
        cfg.paths.cache_dir,
        calib_fp,
        datamodule.eval_transform_description(),
    )
    criterion = get_criterion(cfg.calibrate.criterion)
    table = StageTable.from_probs(probs, labels, criterion, stage_costs_ms(profile))
    return CalibrationInputs(members, calib_fp, profile, table)


def _file_state(path: Path) -> tuple:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return (str(path), None)
    return (str(path), stat.st_size, stat.st_mtime_ns)


def inputs_key(cfg: DictConfig) -> str:
    """Every setting that shapes the inputs, and the state of every file they come from."""
    c = cfg.calibrate
    device = resolve_device(cfg.device)
    files = [*find_member_paths(cfg.paths.members_dir, explicit_order(cfg))]
    files.append(Path(c.latency_profile) if c.latency_profile else stored_profile_path(cfg, device))
    settings = {
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "members_dir": str(cfg.paths.members_dir),
        "cache_dir": str(cfg.paths.cache_dir),
        "order": explicit_order(cfg) or cfg.ensemble.order,
        "device": str(device),
        "criterion": str(c.criterion),
        "latency_profile": c.latency_profile,
        "reprofile": bool(c.reprofile),
        "profile_batch_size": int(c.profile_batch_size),
        "files": [_file_state(p) for p in files],
    }
    return json.dumps(settings, sort_keys=True, default=str)


_last: tuple[str, CalibrationInputs] | None = None


def calibration_inputs(cfg: DictConfig) -> CalibrationInputs:
    """:func:`read_inputs`, or the previous job's inputs when nothing that shapes them changed.

    The key is taken after reading, so a profile this job measured and stored is part of it
    and the next job of a sweep reuses it instead of measuring again: all runs of one sweep
    share one latency profile, which keeps their expected latencies comparable.
    """
    global _last
    if _last is not None and _last[0] == inputs_key(cfg):
        return _last[1]
    _last = None  # let the old inputs go before the new ones are read
    inputs = read_inputs(cfg)
    _last = (inputs_key(cfg), inputs)
    return inputs
