"""What a calibration reads before it searches: members, latency profile, member outputs.

Reading is the slow part of a calibration (checkpoints, the data module, the logit cache).
The task layer keeps the last inputs in its :class:`flexens.memo.SweepMemo`, so the jobs of a
λ sweep read them once; here everything takes typed objects and paths.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from flexens.artifacts import fingerprint, write_json
from flexens.calibration.cache import ensemble_probs, split_probs
from flexens.calibration.schema import (
    PROFILE_FIX,
    PROFILE_FORMAT,
    read_json_file,
    read_profile,
)
from flexens.calibration.settings import CalibrateSettings
from flexens.calibration.simulate import StageTable
from flexens.data.base import EnsembleDataModule
from flexens.halting import get_criterion
from flexens.images import UnlabelledBatches, find_images
from flexens.latency import latency_profile, profile_problems, quick_check, stage_costs_ms
from flexens.members.registry import Member, load_ensemble


@dataclass(frozen=True)
class EnsembleFiles:
    """Where an ensemble lives: its members folder, the output cache, the member order.

    ``order`` is ``None`` (seed order), ``"auto"`` (cheapest member first) or a list of
    seeds or member file names.
    """

    members_dir: Path
    cache_dir: Path
    order: list | str | None = None

    @property
    def explicit_order(self) -> list | None:
        return None if self.order in (None, "auto") else list(self.order)

    def stored_profile(self, device: torch.device) -> Path:
        return self.members_dir / f"latency_profile-{device.type}.json"


@dataclass(frozen=True)
class CalibrationInputs:
    """Members in calibration order and everything simulated from their cached outputs."""

    members: list[Member]
    calib_fingerprint: str
    profile: dict
    table: StageTable
    labelled: bool = True
    """False for ``calibrate.unlabelled``: the table's labels are the full ensemble's answers."""
    split_seed: int = 0
    token: str = field(default_factory=lambda: uuid.uuid4().hex, compare=False)
    """Names this read in :class:`~flexens.memo.SweepMemo` keys of results derived from it."""


def prepare_ensemble(files: EnsembleFiles, datamodule: EnsembleDataModule) -> list[Member]:
    """Members in configured order, checked against the data module."""
    members = load_ensemble(files.members_dir, files.explicit_order)
    datamodule.setup()
    calib_fp = datamodule.calib_fingerprint()
    members_dir = files.members_dir.resolve()
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
    return members


def load_or_measure_profile(
    settings: CalibrateSettings,
    files: EnsembleFiles,
    members: list[Member],
    datamodule: EnsembleDataModule,
    device: torch.device,
) -> dict:
    """A profile given by ``calibrate.latency_profile``, a matching stored one, or a fresh one.

    A stored profile is measured again (with a one-line note) when it is stale: another
    format, device, torch, thread choice, batch size or input shape, twins that disagree, or
    a quick batch-1 re-measurement that is far off. A given profile is taken as it is (it
    may describe another machine).
    """
    hashes = [m.sha256 for m in members]
    given = settings.latency_profile
    stored = files.stored_profile(device)
    path = Path(given) if given else stored
    example = datamodule.calib_set[0][0].unsqueeze(0)
    batch_size = int(settings.profile_batch_size)
    if path.exists() and (given or not settings.reprofile):
        check = None if given else bool(settings.profile_check)
        profile = stored_profile(path, members, device, example, batch_size, check)
        if profile is not None:
            return profile
    profile = latency_profile(
        [m.network for m in members],
        hashes,
        example,
        batch_size,
        device,
        get_criterion(settings.criterion),
        members[0].num_classes,
        seconds=float(settings.profile_seconds),
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


def read_inputs(
    settings: CalibrateSettings,
    files: EnsembleFiles,
    datamodule: EnsembleDataModule,
    device: torch.device,
) -> CalibrationInputs:
    """Load members, profile them (or read their profile) and simulate their cached outputs."""
    members = prepare_ensemble(files, datamodule)
    unlabelled = settings.unlabelled
    images = find_images(unlabelled, "calibrate.unlabelled") if unlabelled else None
    profile = load_or_measure_profile(settings, files, members, datamodule, device)
    if files.order == "auto":
        order = np.argsort([m["batch1_ms"] for m in profile["members"]], kind="stable")
        members = [members[i] for i in order]
        profile = {**profile, "members": [profile["members"][i] for i in order]}
    if images is not None:
        probs, labels = unlabelled_probs(
            members, datamodule, device, Path(settings.unlabelled), images, files.cache_dir
        )
    else:
        probs, labels = split_probs(members, datamodule, "calib", device, files.cache_dir)
    criterion = get_criterion(settings.criterion)
    table = StageTable.from_probs(probs, labels, criterion, stage_costs_ms(profile))
    return CalibrationInputs(
        members,
        datamodule.calib_fingerprint(),
        profile,
        table,
        labelled=not settings.unlabelled,
        split_seed=int(datamodule.split_seed),
    )


def unlabelled_probs(
    members: list[Member],
    datamodule: EnsembleDataModule,
    device: torch.device,
    folder: Path,
    images: list[Path],
    cache_dir: Path,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Member outputs on a folder of unlabelled images (``images``, what it holds),
    labelled by the full ensemble.

    The images are read exactly as ``infer.py input=`` reads them (nested folders, odd
    modes, bad files reported and skipped), one batch at a time in one pass for all the
    members, and not at all when every member's outputs are cached: the cache key is the
    files' names, sizes and modification times. With the full ensemble's answers as
    labels, a stage is "wrong" exactly where it disagrees with the full ensemble, which is
    the loss ``calibrate.risk=disagreement`` certifies.
    """
    files = [(str(p), st.st_size, st.st_mtime_ns) for p in images for st in [p.stat()]]
    batches = UnlabelledBatches(
        folder,
        images,
        members[0].arch.get("in_chans", 3),
        datamodule.image_transform(),
        int(datamodule.eval_batch_size),
    )
    probs, _ = ensemble_probs(
        members,
        DataLoader(batches, batch_size=None),
        device,
        cache_dir,
        fingerprint(["unlabelled", *files]),
        datamodule.eval_transform_description(),
    )
    return probs, probs.mean(dim=0).argmax(dim=-1)
