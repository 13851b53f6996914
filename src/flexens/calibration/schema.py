"""Validation of the calibration's files before anything reads a field of them.

thresholds.json and latency profiles travel between machines and teams; a file that is
truncated, hand-edited or from an older flexens must end in one line that names the file,
the field and the fix, never in a KeyError or TypeError deep inside inference. Each check
below reads only JSON (nothing in these files is ever executed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

THRESHOLDS_FORMAT = "flexens-thresholds-v2"
RECALIBRATE = "recalibrate: python calibrate.py"
PROFILE_FIX = "delete it to measure again (or drop calibrate.latency_profile)"
PROFILE_FORMAT = "flexens-latency-profile-v2"
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
            f"(it carries the certificate); {RECALIBRATE}"
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
    _field(data, "criterion", str, path, what, RECALIBRATE)
    for key in ("calibration", "latency_profile", "certificate"):
        _field(data, key, dict, path, what, RECALIBRATE)
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
            f"{PROFILE_FORMAT!r} (it records threads and fused costs); {fix}"
        )
    threads = _field(data, "threads", dict, path, what, fix)
    for key in ("batch1", "batched"):
        _field(threads, key, int, path, f"{what} (threads)", fix)
    members = _field(data, "members", list, path, what, fix)
    _finite_numbers([data.get("overhead_ms")], "overhead_ms", path, what, fix)
    for i, member in enumerate(members):
        if not isinstance(member, dict) or not isinstance(member.get("sha256"), str):
            raise ValueError(f"{what} {str(path)!r}: members[{i}] is malformed; {fix}")
        costs = [member.get("batch1_ms"), member.get("batched_ms_per_image")]
        _finite_numbers(costs, f"members[{i}] costs", path, what, fix)
        if min(costs) <= 0:
            raise ValueError(f"{what} {str(path)!r}: members[{i}] has a cost <= 0; {fix}")
    return data


def read_thresholds(path: Path) -> dict:
    return validate_thresholds(read_json_file(path, "thresholds file", RECALIBRATE), path)


def read_profile(path: Path) -> dict:
    return validate_profile(read_json_file(path, "latency profile", PROFILE_FIX), path)
