"""Members on disk: ``<members_dir>/seed=<n>.safetensors`` plus its record ``seed=<n>.json``.

The weights file holds tensors only (safetensors), so loading a member never runs code; the
record (:class:`~flexens.members.record.MemberRecord`) holds what it takes to rebuild the
network without Lightning or Hydra (the architecture spec), the member's metadata (data and
calibration-split fingerprints, class names, accuracy, training recipe) and the sha256 of
the weights, which is checked before they are deserialised. The record is written last: a
member without a valid record is unfinished. Old pickled ``seed=<n>.ckpt`` members are never
loaded; ``python -m flexens.members.convert <members_dir> --trust`` converts them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, fields
from pathlib import Path

from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from flexens.artifacts import write_bytes, write_json
from flexens.members.inference_form import inference_network
from flexens.members.networks import create_network
from flexens.members.record import (
    FORMAT,
    FORMAT_VERSION,
    OLD_SUFFIX,
    RECORD_SUFFIX,
    WEIGHTS_SUFFIX,
    MemberRecord,
    convert_command,
)

_SEED_FILE = re.compile(r"^seed=(\d+)\.safetensors$")
_OLD_SEED_FILE = re.compile(r"^seed=(\d+)\.ckpt$")


def member_path(members_dir: str | Path, seed: int) -> Path:
    """The weights file of ``seed``; its record is ``record_path`` of it."""
    return Path(members_dir) / f"seed={seed}{WEIGHTS_SUFFIX}"


def record_path(path: str | Path) -> Path:
    return Path(path).with_suffix(RECORD_SUFFIX)


def _seed_of(path: Path) -> int | None:
    match = _SEED_FILE.match(path.name) or _OLD_SEED_FILE.match(path.name)
    return int(match.group(1)) if match else None


def _retrain_hint(path: Path, force: bool = True) -> str:
    seed = _seed_of(path)
    command = f"python train.py seed={seed if seed is not None else '<n>'}"
    return f"{command} train.force=true" if force else command


def old_format_error(path: Path) -> ValueError:
    return ValueError(
        f"{path} is an old pickled member, which flexens never loads (unpickling can run "
        f"code); if you made it or trust it, convert it: {convert_command(path.parent)}"
    )


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


# -- writing ---------------------------------------------------------------------------------
def weights_bytes(state_dict: dict, name: str) -> bytes:
    """A network's tensors as safetensors bytes (the same bytes for the same weights);
    NaN/Inf weights are refused."""
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in state_dict.items()}
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise ValueError(
            f"member {name} was not written: {len(bad)} of its tensors hold NaN/Inf (first: "
            f"{bad[0]!r}), training diverged; retrain with a lower train.optimizer.lr"
        )
    # one metadata key: safetensors writes several in hash order, which varies from run to
    # run, and identical weights must give identical bytes (and sha256)
    return save_safetensors(tensors, metadata={"format": f"{FORMAT}/{FORMAT_VERSION}"})


def publish_member(path: str | Path, weights: bytes, arch: dict, meta: dict) -> Path:
    """Write a member as one unit: the weights, then the record that completes it.

    Each file goes through a temporary file and a rename; the old record is removed first,
    so at every instant the member is either complete (valid record over matching weights)
    or visibly unfinished (no record), never an old record over new weights.
    """
    path = Path(path)
    known = {f.name for f in fields(MemberRecord)} - {"sha256", "arch", "format_version"}
    unknown = sorted(set(meta) - known)
    if unknown:
        raise TypeError(f"member metadata has unknown fields {unknown}")
    record = record_path(path)
    body = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sha256": hashlib.sha256(weights).hexdigest(),
        "arch": arch,
        **meta,
    }
    content = MemberRecord.from_json(body, record).to_json()  # validated before writing
    record.unlink(missing_ok=True)
    write_bytes(path, weights)
    write_json(record, content)
    return path


def save_member(path: str | Path, network: nn.Module, arch: dict, meta: dict) -> Path:
    """``seed=<n>.safetensors`` and its record ``seed=<n>.json``, written atomically."""
    path = Path(path)
    return publish_member(path, weights_bytes(network.state_dict(), path.name), arch, meta)


# -- reading ---------------------------------------------------------------------------------
@dataclass
class Member:
    seed: int | None
    path: Path
    sha256: str
    arch: dict
    meta: dict
    network: nn.Module

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    def describe(self) -> dict:
        """What thresholds.json records: the file's name inside the members folder."""
        return {
            "seed": self.seed,
            "path": self.path.name,
            "sha256": self.sha256,
            "arch": self.arch.get("arch"),
        }


def read_record(path: str | Path) -> MemberRecord:
    """The validated record of the member whose weights are ``path``; reads no weights."""
    path = Path(path)
    if path.suffix == OLD_SUFFIX:
        raise old_format_error(path)
    if path.suffix != WEIGHTS_SUFFIX:
        raise ValueError(
            f"{path} is not a member weights file (seed=<n>{WEIGHTS_SUFFIX}); name members "
            "by seed or by their .safetensors file"
        )
    if not path.is_file():
        old = path.with_suffix(OLD_SUFFIX)
        if old.is_file():
            raise old_format_error(old)
        raise FileNotFoundError(
            f"member {path} does not exist; train it: {_retrain_hint(path, force=False)} "
            "(with this ensemble's settings)"
        )
    record = record_path(path)
    if not record.is_file():
        raise FileNotFoundError(
            f"member {path} has no record {record.name}, so it is unfinished (interrupted "
            f"while being written); retrain it: {_retrain_hint(path, force=False)}"
        )
    try:
        data = json.loads(record.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"member record {record} is not valid JSON ({first_line(err)}); retrain the "
            f"member: {_retrain_hint(path)}"
        ) from None
    return MemberRecord.from_json(data, record)


def check_tensors(path: Path, tensors: dict, network: nn.Module, arch: dict) -> None:
    expected = network.state_dict()
    spec = ", ".join(f"{k}={v}" for k, v in arch.items() if k != "pretrained")
    fix = f"the weights do not fit the record's arch ({spec}); retrain: {_retrain_hint(path)}"
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise ValueError(
            f"member {path} lacks {len(missing)} tensors (first: {missing[0]!r}); {fix}"
        )
    extra = [k for k in tensors if k not in expected]
    if extra:
        raise ValueError(f"member {path} holds {len(extra)} unknown tensors ({extra[0]!r}); {fix}")
    for key, want in expected.items():
        got = tensors[key]
        if got.shape != want.shape or got.is_floating_point() != want.is_floating_point():
            raise ValueError(
                f"member {path}: tensor {key!r} is {got.dtype} {tuple(got.shape)}, the network "
                f"needs {want.dtype} {tuple(want.shape)}; {fix}"
            )
        if got.is_floating_point() and not got.isfinite().all():
            raise ValueError(
                f"member {path}: tensor {key!r} holds NaN/Inf; retrain: {_retrain_hint(path)}"
            )


def load_member(
    path: str | Path,
    expect_sha256: str | None = None,
    calibrated_in: str | Path | None = None,
    inference_form: bool = True,
) -> Member:
    """Read, verify, then deserialise a member; every bad file is a one-line error.

    The weights are read once into memory and hashed; only bytes whose hash matches the
    record (and ``expect_sha256``, the hash thresholds.json pinned) reach the safetensors
    parser, which builds tensors and nothing else. The network comes back in its inference
    form (:mod:`flexens.members.inference_form`), the one every inference path runs, or with
    ``inference_form=False`` as it was trained (the benchmark times one against the other).
    """
    path = Path(path)
    record = read_record(path)
    data = path.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    if sha256 != record.sha256:
        raise ValueError(
            f"member {path} does not match the sha256 in {record_path(path).name} (the weights "
            f"are damaged or were replaced); retrain it ({_retrain_hint(path)}) or copy both "
            "files again"
        )
    if expect_sha256 is not None and sha256 != expect_sha256:
        where = calibrated_in or "thresholds.json"
        raise ValueError(
            f"{path.name} changed since {where} was calibrated (weights hash differs); "
            "recalibrate: python calibrate.py"
        )
    try:
        tensors = load_safetensors(data)
    except Exception as err:  # the parser's own error types; never a traceback to the user
        raise ValueError(
            f"member {path} is not a readable safetensors file ({first_line(err)}); retrain "
            f"it: {_retrain_hint(path)}"
        ) from None
    try:
        network = create_network(**{**record.arch, "pretrained": None})
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(
            f"member record {record_path(path)}: cannot build its network ({first_line(err)})"
        ) from None
    check_tensors(path, tensors, network, record.arch)
    network.load_state_dict(tensors, strict=True)
    network = inference_network(network) if inference_form else network.eval()
    file_seed = _seed_of(path)
    if file_seed is not None and record.seed is not None and file_seed != record.seed:
        raise ValueError(
            f"member {path} is named for seed {file_seed} but its record says seed "
            f"{record.seed}; a renamed or copied member? rename both files back or drop them"
        )
    seed = file_seed if file_seed is not None else record.seed
    return Member(seed, path, sha256, dict(record.arch), record.meta, network)


def find_member_paths(members_dir: str | Path, order: list | None = None) -> list[Path]:
    """Member weights files in seed order, or in ``order`` (a list of seeds or file paths)."""
    members_dir = Path(members_dir)
    if order:
        paths = [Path(o) if not isinstance(o, int) else member_path(members_dir, o) for o in order]
    else:
        found = [
            (int(m.group(1)), p)
            for p in members_dir.glob(f"seed=*{WEIGHTS_SUFFIX}")
            if (m := _SEED_FILE.match(p.name))
        ]
        old = sorted(
            p
            for p in members_dir.glob(f"seed=*{OLD_SUFFIX}")
            if _OLD_SEED_FILE.match(p.name) and not p.with_suffix(WEIGHTS_SUFFIX).exists()
        )
        if old:
            raise old_format_error(old[0])
        paths = [p for _, p in sorted(found)]
    if not paths:
        raise FileNotFoundError(
            f"no members in {str(members_dir)!r}; train some first: python train.py -m seed=0,1,2"
        )
    return paths


def check_distinct(paths: list[Path], records: list[MemberRecord]) -> None:
    """One member may join an ensemble once: no file twice, no weights under two names."""
    seen: dict[str, Path] = {}
    for path, record in zip(paths, records, strict=True):
        first = seen.setdefault(record.sha256, path)
        if first is path:
            continue
        if first.resolve() == path.resolve():
            raise ValueError(f"{path.name} is listed twice; list each member once")
        raise ValueError(
            f"members {first.name} and {path.name} hold the same weights (sha256 "
            f"{record.sha256[:12]}…), so one member would count twice; delete the copy"
        )


def load_ensemble(members_dir: str | Path, order: list | None = None) -> list[Member]:
    """Load members and check they can be averaged (distinct, same classes, same data)."""
    paths = find_member_paths(members_dir, order)
    check_distinct(paths, [read_record(p) for p in paths])
    members = [load_member(p) for p in paths]
    first = members[0]
    for m in members[1:]:
        if m.num_classes != first.num_classes:
            raise ValueError(
                f"member {m.path.name} has {m.num_classes} classes but {first.path.name} has "
                f"{first.num_classes}; an ensemble needs one label space (retrain or drop it)"
            )
        if m.meta.get("calib_fingerprint") != first.meta.get("calib_fingerprint"):
            raise ValueError(
                f"member {m.path.name} was trained with another calibration split than "
                f"{first.path.name}; retrain it with the same data.split_seed/calib_fraction"
            )
    return members
