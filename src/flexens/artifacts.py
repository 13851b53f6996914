"""Atomic writes and content fingerprints: an artifact is either complete or absent.

Every file is written to a temporary ``.<name>.<host>-<pid>.<random>.tmp`` beside it and
renamed into place. A writer killed mid-write leaves only such a temporary file; the next
write into that folder removes the ones whose writer (same host, that pid) is gone, so a
rerun cleans up after the run it repeats, while a concurrent writer's file is left alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

_TEMP = re.compile(r"^\..+\.(?P<host>[^.]+)-(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
_LEGACY_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # tempfile.mkstemp's names
LEGACY_TEMP_AGE_S = 3600.0
"""Temporary files of older flexens versions (``.<name>.<8 random>.tmp``, no writer
recorded) are stray once this old; no write takes an hour between creating and renaming."""


def _host() -> str:
    """This machine's name as it appears in temporary file names (no dots or dashes)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def stray_temp_files(folder: str | Path) -> list[Path]:
    """Temporary files in ``folder`` left by killed writers (never a live writer's)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stray = []
    for path in folder.glob(".*.tmp"):
        match = _TEMP.match(path.name)
        if match:
            if match["host"] == _host() and not _alive(int(match["pid"])):
                stray.append(path)
        elif _LEGACY_TEMP.match(path.name) and _old_enough(path):
            stray.append(path)
    return sorted(stray)


def _old_enough(path: Path) -> bool:
    try:
        return time.time() - path.stat().st_mtime > LEGACY_TEMP_AGE_S
    except FileNotFoundError:  # its writer just renamed it
        return False


def remove_stray_temp_files(folder: str | Path) -> list[Path]:
    """Remove what killed writers left in ``folder``; returns the removed files."""
    removed = []
    for path in stray_temp_files(folder):
        try:
            path.unlink()
        except FileNotFoundError:  # a concurrent cleaner was first
            continue
        removed.append(path)
    return removed


def _temp_file(path: Path) -> Path:
    """Create the temporary file for ``path`` with the permissions of any new file.

    ``tempfile.mkstemp`` would create it 0600, and the rename would publish a file only its
    owner can read; ``os.open`` with 0666 lets the umask decide, as for ``open(path, "w")``.
    """
    while True:
        tmp = path.parent / f".{path.name}.{_host()}-{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp


def _atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stray_temp_files(path.parent)
    tmp = _temp_file(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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
