"""Validation of the calibration's files before anything reads a field of them.

thresholds.json and latency profiles travel between machines and teams; a file that is
truncated, hand-edited or from an older flexens must end in one line that names the file,
the field and the fix, never in a KeyError or TypeError deep inside inference. Each check
below reads only JSON (nothing in these files is ever executed).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

THRESHOLDS_FORMAT = "flexens-thresholds-v3"
"""v3: front points name their latency `expected_latency_ms` like every summary (v2: `latency_ms`)."""
RECALIBRATE = "recalibrate: python calibrate.py"
PROFILE_FIX = "delete it to measure again (or drop calibrate.latency_profile)"
PROFILE_FORMAT = "flexens-latency-profile-v4"
"""Written by :func:`flexens.latency.latency_profile` (which imports it from here)."""


def read_json_file(path: Path, what: str, fix: str) -> dict:
    """A JSON object from ``path``, or a one-line error naming the file and the fix."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{what} {str(path)!r} is not readable JSON ({err}); {fix}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {str(path)!r} holds {type(data).__name__}, not an object; {fix}")
    return data


def _field(data: dict, key: str, kind, path: Path, what: str, fix: str):
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ValueError(
            f"{what} {str(path)!r}: field {key!r} must be {names}, got {json.dumps(value)[:60]}; "
            f"{fix}"
        )
    return value


def _finite_numbers(values, key: str, path: Path, what: str, fix: str) -> None:
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(
                f"{what} {str(path)!r}: field {key!r} must hold finite numbers, got "
                f"{json.dumps(v)[:40]}; {fix}"
            )


def validate_thresholds(data: dict, path: Path) -> dict:
    """thresholds.json as written by calibrate.py, checked field by field."""
    what = "thresholds file"
    fmt = data.get("format")
    if fmt != THRESHOLDS_FORMAT:
        raise ValueError(
            f"{what} {str(path)!r} has format {fmt!r}, this flexens reads {THRESHOLDS_FORMAT!r} "
            f"(written by an older flexens); {RECALIBRATE}"
        )
    members = _field(data, "members", list, path, what, RECALIBRATE)
    if not members:
        raise ValueError(f"{what} {str(path)!r} names no members; {RECALIBRATE}")
    for i, member in enumerate(members):
        if not isinstance(member, dict):
            raise ValueError(f"{what} {str(path)!r}: members[{i}] must be an object; {RECALIBRATE}")
        for key in ("path", "sha256"):
            _field(member, key, str, path, f"{what} (members[{i}])", RECALIBRATE)
    thresholds = _field(data, "thresholds", list, path, what, RECALIBRATE)
    _finite_numbers(thresholds, "thresholds", path, what, RECALIBRATE)
    if len(thresholds) != len(members) - 1:
        raise ValueError(
            f"{what} {str(path)!r} holds {len(thresholds)} thresholds for {len(members)} "
            f"members; {RECALIBRATE}"
        )
    fuse_from = data.get("fuse_from")
    if fuse_from is not None and (
        isinstance(fuse_from, bool)
        or not isinstance(fuse_from, int)
        or not 1 <= fuse_from <= len(members) - 2
    ):
        raise ValueError(
            f"{what} {str(path)!r}: fuse_from must be null or a stage in 1..{len(members) - 2}, "
            f"got {json.dumps(fuse_from)[:40]}; {RECALIBRATE}"
        )
    _field(data, "criterion", str, path, what, RECALIBRATE)
    _field(data, "ensemble", str, path, what, RECALIBRATE)
    for key in ("calibration", "latency_profile", "certificate"):
        _field(data, key, dict, path, what, RECALIBRATE)
    split = data["calibration"]
    _field(split, "num_samples", int, path, f"{what} (calibration)", RECALIBRATE)
    for mode in ("flexible", "full"):
        summary = _field(split, mode, dict, path, f"{what} (calibration)", RECALIBRATE)
        values = [summary.get(k) for k in ModeSummary.__dataclass_fields__]
        _finite_numbers(values, f"calibration.{mode}", path, what, RECALIBRATE)
    for key in ("certified_front", "pareto_front"):
        for i, point in enumerate(_field(data, key, list, path, what, RECALIBRATE)):
            if not isinstance(point, dict) or not isinstance(point.get("thresholds"), list):
                raise ValueError(f"{what} {str(path)!r}: {key}[{i}] is malformed; {RECALIBRATE}")
            _finite_numbers(point["thresholds"], f"{key}[{i}].thresholds", path, what, RECALIBRATE)
    return data


def validate_profile(data: dict, path: Path) -> dict:
    """A latency profile: per-member batch-1 and batched costs, all finite and positive."""
    what, fix = "latency profile", PROFILE_FIX
    if data.get("format") != PROFILE_FORMAT:
        raise ValueError(
            f"{what} {str(path)!r} has format {data.get('format')!r}, this flexens reads "
            f"{PROFILE_FORMAT!r} (it records the members' inference form, threads, fused "
            f"costs and per-image cost by batch size); {fix}"
        )
    _field(data, "network_form", str, path, what, fix)
    threads = _field(data, "threads", dict, path, what, fix)
    for key in ("batch1", "batched"):
        _field(threads, key, int, path, f"{what} (threads)", fix)
    members = _field(data, "members", list, path, what, fix)
    _finite_numbers([data.get("overhead_ms")], "overhead_ms", path, what, fix)
    if "staged_overhead_ms" in data:  # profiles before flexens measured it price with overhead_ms
        _finite_numbers([data["staged_overhead_ms"]], "staged_overhead_ms", path, what, fix)
    sizes = _field(data, "curve_batch_sizes", list, path, what, fix)
    if not sizes or any(not isinstance(b, int) or b < 1 for b in sizes) or sizes != sorted(sizes):
        raise ValueError(
            f"{what} {str(path)!r}: curve_batch_sizes must be increasing batch sizes >= 1, "
            f"got {str(sizes)[:80]}; {fix}"
        )
    for i, member in enumerate(members):
        if not isinstance(member, dict) or not isinstance(member.get("sha256"), str):
            raise ValueError(f"{what} {str(path)!r}: members[{i}] is malformed; {fix}")
        curve = member.get("curve_ms_per_image")
        if not isinstance(curve, list) or len(curve) != len(sizes):
            raise ValueError(
                f"{what} {str(path)!r}: members[{i}].curve_ms_per_image must list one cost per "
                f"curve_batch_sizes entry ({len(sizes)}); {fix}"
            )
        costs = [member.get("batch1_ms"), member.get("batched_ms_per_image"), *curve]
        _finite_numbers(costs, f"members[{i}] costs", path, what, fix)
        if min(costs) <= 0:
            raise ValueError(f"{what} {str(path)!r}: members[{i}] has a cost <= 0; {fix}")
    return data


@dataclass(frozen=True)
class ModeSummary:
    """One execution mode on the calibration split; the latency is the profile's estimate."""

    accuracy: float
    avg_members: float
    expected_latency_ms: float


@dataclass(frozen=True)
class MemberRef:
    """A member as thresholds.json names it: a file inside the members folder, and its hash."""

    path: str
    sha256: str


@dataclass(frozen=True)
class Calibration:
    """What serving a thresholds.json needs, read once and typed (infer.py, serve.py).

    The file holds more (search statistics, the λ curve, the latency profile) for people
    and plots; those stay in the JSON. Fronts are lists of plain points (``thresholds``,
    ``accuracy``, ``avg_members``, ``latency_ms``, and ``certified_epsilon`` on the
    certified front).
    """

    ensemble: str
    members: tuple[MemberRef, ...]
    criterion: str
    thresholds: tuple[float, ...]
    certificate: dict
    num_samples: int
    flexible: ModeSummary
    full: ModeSummary
    certification: dict | None
    certified_front: tuple[dict, ...]
    pareto_front: tuple[dict, ...]
    latency_profile: dict | None = None
    """The profile the expected latencies were priced with: infer's latency model."""
    fuse_from: int | None = None
    """Where fused continuation is expected to pay for these thresholds (None: nowhere)."""

    @classmethod
    def from_json(cls, data: dict, path: Path) -> Calibration:
        """Checked field by field first: a bad file is one line naming the field."""
        validate_thresholds(data, path)
        split = data["calibration"]
        summary = lambda mode: ModeSummary(  # noqa: E731
            **{k: float(split[mode][k]) for k in ModeSummary.__dataclass_fields__}
        )
        return cls(
            ensemble=data["ensemble"],
            members=tuple(MemberRef(m["path"], m["sha256"]) for m in data["members"]),
            criterion=data["criterion"],
            thresholds=tuple(float(t) for t in data["thresholds"]),
            certificate=data["certificate"],
            num_samples=int(split["num_samples"]),
            flexible=summary("flexible"),
            full=summary("full"),
            certification=data.get("certification"),
            certified_front=tuple(data["certified_front"]),
            pareto_front=tuple(data["pareto_front"]),
            latency_profile=data.get("latency_profile"),
            fuse_from=data.get("fuse_from"),
        )


def read_thresholds(path: Path) -> Calibration:
    return Calibration.from_json(read_json_file(path, "thresholds file", RECALIBRATE), path)


def read_profile(path: Path) -> dict:
    return validate_profile(read_json_file(path, "latency profile", PROFILE_FIX), path)
