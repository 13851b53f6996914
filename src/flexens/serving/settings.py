"""``serve.*`` as one typed, checked object: nothing below the entry point reads the config."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from flexens.serving.points import SETTINGS
from flexens.serving.slo import SloPolicy

HOSTS = ("127.0.0.1", "0.0.0.0", "::")
"""What LitServe binds to: loopback only (the default), or every interface."""


@dataclass(frozen=True)
class ServeSettings:
    thresholds: Path
    members_dir: Path
    host: str
    port: int
    mode: str
    max_batch_size: int
    batch_timeout: float
    workers_per_device: int
    threads: int | None
    cuda_graphs: bool
    timeout: float
    max_body_bytes: int
    max_pixels: int
    max_in_flight: int | None
    fast_queue: bool
    device: str
    default_point: tuple[str, float] | None
    limits: dict[str, tuple[float, float] | None]
    slo_ms: float | None
    slo_ladder: tuple[float, ...]
    slo: dict


def _whole(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"serve.{name} must be a whole number >= {low}, got {value!r}")
    return value


def _flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"serve.{name} must be true or false, got {value!r}")
    return value


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"serve.{name} must be a finite number, got {value!r}")
    return float(value)


def _limits(raw: dict) -> dict[str, tuple[float, float] | None]:
    unknown = sorted(set(raw) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown serve.limits {unknown}; use {', '.join(SETTINGS)}")
    limits: dict[str, tuple[float, float] | None] = {}
    for key in SETTINGS:
        pair = raw.get(key)
        if pair is None:
            limits[key] = None
            continue
        if not isinstance(pair, list) or len(pair) != 2:
            raise ValueError(f"serve.limits.{key} must be [min, max] or null, got {pair!r}")
        low, high = (_number(v, f"limits.{key}") for v in pair)
        if low > high:
            raise ValueError(f"serve.limits.{key} is [min, max], got min {low} > max {high}")
        limits[key] = (low, high)
    return limits


def _default_point(raw: dict) -> tuple[str, float] | None:
    chosen = {k: v for k, v in raw.items() if v is not None}
    if len(chosen) > 1:
        raise ValueError(f"pick one serve.operating_point setting, got {sorted(chosen)}")
    if not chosen:
        return None
    ((key, value),) = chosen.items()
    if key not in SETTINGS:
        raise ValueError(f"unknown serve.operating_point.{key}; use {', '.join(SETTINGS)}")
    return key, _number(value, f"operating_point.{key}")


SLO_NUMBERS = ("window_s", "step_up_at", "step_down_at", "hold_s")


def _slo(raw: dict) -> dict:
    """``serve.slo`` with its values checked for type; :class:`SloPolicy` checks ranges."""
    unknown = sorted(set(raw) - {"ladder", "min_samples", "shed_at", *SLO_NUMBERS})
    if unknown:
        raise ValueError(f"unknown serve.slo setting(s) {unknown}")
    checked = {k: _number(raw[k], f"slo.{k}") for k in SLO_NUMBERS if k in raw}
    if "min_samples" in raw:
        checked["min_samples"] = _whole(raw["min_samples"], "slo.min_samples", 1)
    if raw.get("shed_at") is not None:  # null: never shed
        checked["shed_at"] = _number(raw["shed_at"], "slo.shed_at")
    return {**raw, **checked}


def read_settings(s: dict, members_dir: Path, device: str) -> ServeSettings:
    """Check every ``serve.*`` value (``s``, the group as plain data) before anything is
    loaded; one line per mistake."""
    if s["host"] not in HOSTS:
        raise ValueError(f"serve.host must be one of {', '.join(HOSTS)}, got {s['host']!r}")
    if s["mode"] not in ("flexible", "full"):
        raise ValueError(f"serve.mode must be flexible or full, got {s['mode']!r}")
    port = _whole(s["port"], "port", 1024)
    if port > 65535:
        raise ValueError(f"serve.port must be 1024..65535, got {port}")
    if s["batch_timeout"] is None or _number(s["batch_timeout"], "batch_timeout") < 0:
        raise ValueError(f"serve.batch_timeout must be >= 0 seconds, got {s['batch_timeout']!r}")
    slo_ms = None if s["slo_ms"] is None else _number(s["slo_ms"], "slo_ms")
    slo = _slo(dict(s["slo"]))
    ladder = tuple(_number(e, "slo.ladder") for e in slo.pop("ladder") or [])
    if slo_ms is not None:  # checked now, not at the first request
        SloPolicy(slo_ms, tuple(range(len(ladder) + 1, 0, -1)), **slo)
    return ServeSettings(
        thresholds=Path(s["thresholds"]),
        members_dir=members_dir,
        host=s["host"],
        port=port,
        mode=s["mode"],
        max_batch_size=_whole(s["max_batch_size"], "max_batch_size", 1),
        batch_timeout=float(s["batch_timeout"]),
        workers_per_device=_whole(s["workers_per_device"], "workers_per_device", 1),
        threads=None if s["threads"] is None else _whole(s["threads"], "threads", 1),
        cuda_graphs=_flag(s["cuda_graphs"], "cuda_graphs"),
        timeout=_number(s["timeout"], "timeout"),
        max_body_bytes=_whole(s["max_body_bytes"], "max_body_bytes", 1),
        max_pixels=_whole(s["max_pixels"], "max_pixels", 1),
        max_in_flight=(
            None if s["max_in_flight"] is None else _whole(s["max_in_flight"], "max_in_flight", 1)
        ),
        fast_queue=bool(s["fast_queue"]),
        device=device,
        default_point=_default_point(s["operating_point"]),
        limits=_limits(s["limits"]),
        slo_ms=slo_ms,
        slo_ladder=ladder,
        slo=slo,
    )
