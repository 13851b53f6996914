"""Atomic writes and content fingerprints: an artifact is either complete or absent."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch


def _atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON through a temporary file and rename, so readers never see half a file."""
    text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n"
    return _atomic(path, lambda tmp: tmp.write_text(text))


def write_text(path: str | Path, text: str) -> Path:
    return _atomic(path, lambda tmp: tmp.write_text(text))


def write_bytes(path: str | Path, data: bytes) -> Path:
    return _atomic(path, lambda tmp: tmp.write_bytes(data))


def torch_save(path: str | Path, obj: Any) -> Path:
    return _atomic(path, lambda tmp: torch.save(obj, tmp))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(parts: Iterable[Any]) -> str:
    """Short stable hash of a sequence of printable parts."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(repr(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def replace_marked_section(path: str | Path, name: str, section: str) -> Path:
    """Rewrite the text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``path``
    (appending the markers when missing), keeping the rest: generated tables in hand-written
    documents such as BENCHMARKS.md."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    return write_text(path, f"{head}{begin}\n{section}{end}{rest.split(end, 1)[1]}")
