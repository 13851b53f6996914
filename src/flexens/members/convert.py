"""Convert old pickled members (``seed=<n>.ckpt``) to ``seed=<n>.safetensors`` + ``seed=<n>.json``.

    python -m flexens.members.convert outputs/members/<ensemble> --trust

Reading an old member means unpickling it, which runs whatever code the file contains, so it
happens only behind ``--trust``: for files you trained yourself or otherwise trust. Without
it the command lists the files and stops. The converted member is written like a trained
one (weights, then the record that completes it) and loads without running any code; the
old ``.ckpt`` is left in place, no longer read, for you to delete.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import torch

from flexens.members.networks import create_network
from flexens.members.record import MemberRecord, convert_command
from flexens.members.registry import (
    check_tensors,
    first_line,
    load_member,
    member_path,
    publish_member,
    weights_bytes,
)

OLD_FORMAT = "flexens-member-v1"
_OLD_FILE = re.compile(r"^seed=(\d+)\.ckpt$")
_META_FIELDS = set(MemberRecord.TYPES) - {"sha256", "arch", "format_version"}


def old_members(members_dir: Path) -> list[tuple[int, Path]]:
    """The old members that have no valid converted member beside them yet."""
    found = [(int(m.group(1)), p) for p in members_dir.iterdir() if (m := _OLD_FILE.match(p.name))]
    return [(seed, p) for seed, p in sorted(found) if not converted(member_path(members_dir, seed))]


def converted(new: Path) -> bool:
    try:
        load_member(new)
    except (ValueError, FileNotFoundError):
        return False
    return True


def convert_one(old: Path, seed: int) -> Path:
    """Unpickle ``old`` (trusted by the caller), check it, publish it in the new format."""
    new = member_path(old.parent, seed)
    try:
        payload = torch.load(old, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated, empty, garbage
        raise ValueError(f"{old} is unreadable ({first_line(err)}); retrain it") from None
    if not isinstance(payload, dict) or payload.get("format") != OLD_FORMAT:
        raise ValueError(f"{old} is not an old flexens member ({OLD_FORMAT}); nothing converted")
    arch, meta, state = payload.get("arch"), payload.get("meta"), payload.get("state_dict")
    if not (isinstance(arch, dict) and isinstance(meta, dict) and isinstance(state, dict)):
        raise ValueError(f"{old} lacks its arch, meta or state_dict; retrain it")
    meta = {k: v for k, v in meta.items() if k in _META_FIELDS}
    meta.setdefault("seed", seed)
    if isinstance(meta.get("val_acc"), float) and not math.isfinite(meta["val_acc"]):
        meta["val_acc"] = None
    try:
        network = create_network(**{**arch, "pretrained": None})
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{old}: cannot build its network ({first_line(err)})") from None
    check_tensors(old, state, network, arch)
    publish_member(new, weights_bytes(state, new.name), arch, meta)
    load_member(new)  # what every later run will do; fails loudly here if anything is off
    return new


def convert(members_dir: Path, trust: bool) -> int:
    if not members_dir.is_dir():
        raise FileNotFoundError(f"members folder {str(members_dir)!r} does not exist")
    todo = old_members(members_dir)
    if not todo:
        print(f"no unconverted seed=<n>.ckpt members in {members_dir}; nothing to do")
        return 0
    names = ", ".join(p.name for _, p in todo)
    if not trust:
        raise ValueError(
            f"converting {names} means unpickling them, which runs any code they contain; "
            f"only if you made them or trust them: {convert_command(members_dir)}"
        )
    print(
        f"--trust: unpickling {names} with torch.load(weights_only=False), which runs any "
        "code they contain"
    )
    failed = 0
    for seed, old in todo:
        try:
            new = convert_one(old, seed)
        except (ValueError, FileNotFoundError) as err:
            print(f"error: {err.args[0]}", file=sys.stderr)
            failed += 1
            continue
        print(f"converted {old.name} -> {new.name} + {new.with_suffix('.json').name}")
    if failed < len(todo):
        print(
            "the converted members load without running code; the .ckpt files are no longer "
            "read: delete them once you are satisfied"
        )
    return 2 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flexens.members.convert",
        description="Convert old pickled members (seed=<n>.ckpt) to safetensors + JSON.",
    )
    parser.add_argument("members_dir", type=Path, help="folder holding seed=<n>.ckpt files")
    parser.add_argument(
        "--trust",
        action="store_true",
        help="unpickle the .ckpt files (runs any code in them): only for files you trust",
    )
    args = parser.parse_args(argv)
    try:
        return convert(args.members_dir, args.trust)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
