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
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from flexens.artifacts import fingerprint, write_json
from flexens.calibration.cache import ensemble_probs, split_probs
from flexens.calibration.schema import (
    PROFILE_FIX,
    PROFILE_FORMAT,
    read_json_file,
    read_profile,
)
from flexens.calibration.simulate import StageTable
from flexens.halting import get_criterion
from flexens.images import find_images, load_images
from flexens.latency import (
    latency_profile,
    profile_problems,
    quick_check,
    resolve_device,
    stage_costs_ms,
)
from flexens.members.registry import Member, find_member_paths, load_ensemble


@dataclass(frozen=True)
class CalibrationInputs:
    """Members in calibration order and everything simulated from their cached outputs."""

    members: list[Member]
    calib_fingerprint: str
    profile: dict
    table: StageTable
    labelled: bool = True
    """False for ``calibrate.unlabelled``: the table's labels are the full ensemble's answers."""
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
    members_dir = Path(cfg.paths.members_dir).resolve()
    for m in members:
        if m.path.resolve().parent != members_dir:
            raise ValueError(
                f"member {str(m.path)!r} is outside the members folder {str(members_dir)!r}; "
                "thresholds.json names members inside it, so copy the member (.safetensors "
                "and .json) there first"
            )
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
    """A profile given by ``calibrate.latency_profile``, a matching stored one, or a fresh one.

    A stored profile is measured again (with a one-line note) when it is stale: another
    format, device, torch, thread choice, batch size or input shape, twins that disagree, or
    a quick batch-1 re-measurement that is far off. A given profile is taken as it is (it
    may describe another machine).
    """
    hashes = [m.sha256 for m in members]
    c = cfg.calibrate
    given = c.latency_profile
    stored = stored_profile_path(cfg, device)
    path = Path(given) if given else stored
    example = datamodule.calib_set[0][0].unsqueeze(0)
    batch_size = int(cfg.calibrate.profile_batch_size)
    if path.exists() and (given or not cfg.calibrate.reprofile):
        profile = stored_profile(
            path,
            members,
            device,
            example,
            batch_size,
            check=None if given else bool(c.profile_check),
        )
        if profile is not None:
            return profile
    profile = latency_profile(
        [m.network for m in members],
        hashes,
        example,
        batch_size,
        device,
        get_criterion(cfg.calibrate.criterion),
        members[0].num_classes,
        seconds=float(c.profile_seconds),
    )
    write_json(stored, profile)
    return {**profile, "source": "measured"}


def stored_profile(
    path: Path, members: list[Member], device, example, batch_size: int, check: bool | None
) -> dict | None:
    """The profile in ``path`` for these members, or None (with a note) when it is stale.

    ``check`` None: the profile was given (it may describe another machine), so it is taken
    as it is; False skips only the quick re-measurement.
    """
    given = check is None
    hashes = [m.sha256 for m in members]
    if (
        not given
        and read_json_file(path, "latency profile", PROFILE_FIX).get("format") != PROFILE_FORMAT
    ):
        print(f"note: {path} was written by an older flexens; measuring the members again")
        return None
    profile = read_profile(path)
    by_hash = {m["sha256"]: m for m in profile["members"]}
    if not set(hashes) <= set(by_hash):
        if given:
            raise ValueError(
                f"latency profile {str(path)!r} was measured for other members; "
                "measure one for these checkpoints or drop calibrate.latency_profile"
            )
        return None
    profile = {**profile, "members": [by_hash[h] for h in hashes], "source": str(path)}
    if given:
        return profile
    problems = profile_problems(profile, device, batch_size, example.shape[1:])
    problem = problems[0] if problems else None
    if check and problem is None:
        problem = quick_check(profile, [m.network for m in members], example, device)
    if problem:
        print(f"note: {path} is stale ({problem}); measuring the members again")
        return None
    return profile


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
    if cfg.calibrate.unlabelled:
        probs, labels = unlabelled_probs(members, datamodule, device, cfg)
    else:
        probs, labels = split_probs(members, datamodule, "calib", device, cfg.paths.cache_dir)
    criterion = get_criterion(cfg.calibrate.criterion)
    table = StageTable.from_probs(probs, labels, criterion, stage_costs_ms(profile))
    return CalibrationInputs(
        members, calib_fp, profile, table, labelled=not cfg.calibrate.unlabelled
    )


def unlabelled_probs(members: list[Member], datamodule, device, cfg: DictConfig):
    """Member outputs on a folder of unlabelled images, labelled by the full ensemble.

    The images are read exactly as ``infer.py input=`` reads them (nested folders, odd
    modes, bad files reported and skipped). With the full ensemble's answers as labels, a
    stage is "wrong" exactly where it disagrees with the full ensemble, which is the loss
    ``calibrate.risk=disagreement`` certifies.
    """
    folder = cfg.calibrate.unlabelled
    paths = find_images(folder)
    loaded = load_images(paths, members[0].arch.get("in_chans", 3), datamodule.image_transform())
    for path, reason in loaded.failures:
        print(f"skipped {path}: {reason}")
    if not loaded.paths:
        raise ValueError(f"none of the {len(paths)} image(s) under {folder!r} could be read")
    stats = [(p, p.stat()) for p in loaded.paths]
    files = [(str(p), st.st_size, st.st_mtime_ns) for p, st in stats]
    dataset = TensorDataset(loaded.tensors, torch.zeros(len(loaded.paths), dtype=torch.long))
    probs, _ = ensemble_probs(
        members,
        DataLoader(dataset, batch_size=int(datamodule.eval_batch_size)),
        device,
        cfg.paths.cache_dir,
        fingerprint(["unlabelled", *files]),
        datamodule.eval_transform_description(),
    )
    return probs, probs.mean(dim=0).argmax(dim=-1)


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
        "profile_check": bool(c.profile_check),
        "profile_batch_size": int(c.profile_batch_size),
        "unlabelled": c.unlabelled,
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
