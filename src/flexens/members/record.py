"""A member's completion record: ``seed=<n>.json`` beside its weights ``seed=<n>.safetensors``.

The record is plain JSON: the architecture spec that rebuilds the network, the member's
metadata, and the sha256 of its weights file. It is written last, so a member without a
valid record is unfinished; and the weights are only deserialised after their hash matched
the record. Safetensors holds tensors and nothing else, so loading a member never runs code.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

FORMAT = "flexens-member"
FORMAT_VERSION = 2
"""Version 1 was a pickled ``seed=<n>.ckpt``; it is never loaded, only converted."""

WEIGHTS_SUFFIX = ".safetensors"
RECORD_SUFFIX = ".json"
OLD_SUFFIX = ".ckpt"

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def convert_command(members_dir: str | Path) -> str:
    return f"python -m flexens.members.convert {members_dir} --trust"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(
        value
    )


_CHECKS = {
    "int": (_is_int, "an integer"),
    "int?": (lambda v: v is None or _is_int(v), "an integer or null"),
    "number": (_is_number, "a finite number"),
    "number?": (lambda v: v is None or _is_number(v), "a finite number or null"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "str?": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "dict": (lambda v: isinstance(v, dict), "an object"),
    "dict?": (lambda v: v is None or isinstance(v, dict), "an object or null"),
    "names": (
        lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
        "a list of strings",
    ),
}


@dataclass(frozen=True)
class MemberRecord:
    """The typed content of ``seed=<n>.json``; :meth:`from_json` refuses anything else."""

    sha256: str
    """Of the weights file, checked before the weights are deserialised."""
    arch: dict
    seed: int | None
    num_classes: int
    calib_fingerprint: str
    class_names: list
    ensemble: str | None = None
    data: dict | None = None
    val_acc: float | None = None
    epochs: int | None = None
    train_time_s: float | None = None
    recipe: dict | None = None
    recipe_fingerprint: str | None = None
    format_version: int = FORMAT_VERSION

    TYPES = {
        "sha256": "str",
        "arch": "dict",
        "seed": "int?",
        "num_classes": "int",
        "calib_fingerprint": "str",
        "class_names": "names",
        "ensemble": "str?",
        "data": "dict?",
        "val_acc": "number?",
        "epochs": "int?",
        "train_time_s": "number?",
        "recipe": "dict?",
        "recipe_fingerprint": "str?",
        "format_version": "int",
    }

    @property
    def meta(self) -> dict:
        """Everything but the arch spec, the hash and the format: what training recorded."""
        skip = {"arch", "sha256", "format_version"}
        return {k: v for k, v in asdict(self).items() if k not in skip}

    def to_json(self) -> dict:
        body = asdict(self)
        version = body.pop("format_version")
        return {"format": FORMAT, "format_version": version, **body}

    @classmethod
    def from_json(cls, data: Any, source: str | Path) -> MemberRecord:
        """Validate a parsed record; a bad one is a one-line ValueError naming field and file."""
        fix = "retrain this member (train.py ... train.force=true) or copy it again"
        if not isinstance(data, dict):
            raise ValueError(f"member record {source} is not a JSON object; {fix}")
        if data.get("format") != FORMAT or "format_version" not in data:
            members_dir = Path(source).parent
            raise ValueError(
                f"member record {source} is not a {FORMAT} record (format "
                f"{data.get('format')!r}; an old .ckpt member's JSON?); convert old members: "
                f"{convert_command(members_dir)}, or {fix}"
            )
        if data["format_version"] != FORMAT_VERSION:
            raise ValueError(
                f"member record {source} has format_version {data['format_version']!r}, this "
                f"flexens reads version {FORMAT_VERSION}; use the flexens that wrote it, or {fix}"
            )
        values = {}
        for f in fields(cls):
            required = f.default is MISSING
            if f.name not in data:
                if required:
                    raise ValueError(f"member record {source} lacks field {f.name!r}; {fix}")
                continue
            check, expected = _CHECKS[cls.TYPES[f.name]]
            value = data[f.name]
            if not check(value):
                raise ValueError(
                    f"member record {source}: field {f.name!r} must be {expected}, got "
                    f"{json.dumps(value)[:60]}; {fix}"
                )
            values[f.name] = value
        if not _SHA256.match(values["sha256"]):
            raise ValueError(
                f"member record {source}: field 'sha256' must be 64 lowercase hex digits, got "
                f"{values['sha256'][:70]!r}; {fix}"
            )
        arch = values["arch"]
        if (
            not isinstance(arch.get("arch"), str)
            or arch.get("num_classes") != values["num_classes"]
        ):
            raise ValueError(
                f"member record {source}: field 'arch' must name the architecture ('arch') and "
                f"its num_classes ({values['num_classes']}); {fix}"
            )
        return cls(**values)
