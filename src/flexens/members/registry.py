"""Members on disk: ``<members_dir>/seed=<n>.ckpt`` plus a readable ``seed=<n>.json``.

A member file holds what it takes to rebuild the network without Lightning or Hydra:
the architecture spec, the weights, and metadata (data and calibration-split fingerprints,
class names, accuracy, training time).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flexens.artifacts import file_sha256, torch_save, write_json
from flexens.members.networks import create_network

FORMAT = "flexens-member-v1"
_SEED_FILE = re.compile(r"^seed=(\d+)\.ckpt$")


def member_path(members_dir: str | Path, seed: int) -> Path:
    return Path(members_dir) / f"seed={seed}.ckpt"


def save_member(path: str | Path, network: nn.Module, arch: dict, meta: dict) -> Path:
    path = Path(path)
    payload = {
        "format": FORMAT,
        "arch": arch,
        "meta": meta,
        "state_dict": {k: v.detach().cpu() for k, v in network.state_dict().items()},
    }
    torch_save(path, payload)
    write_json(path.with_suffix(".json"), {"arch": arch, **meta, "sha256": file_sha256(path)})
    return path


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
        return {
            "seed": self.seed,
            "path": str(self.path),
            "sha256": self.sha256,
            "arch": self.arch.get("arch"),
        }


def load_member(path: str | Path) -> Member:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"member checkpoint {str(path)!r} does not exist; train it with train.py"
        )
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a flexens member file; train members with train.py")
    arch = dict(payload["arch"])
    network = create_network(**{**arch, "pretrained": None})
    network.load_state_dict(payload["state_dict"])
    network.eval()
    match = _SEED_FILE.match(path.name)
    seed = int(match.group(1)) if match else payload["meta"].get("seed")
    return Member(seed, path, file_sha256(path), arch, payload["meta"], network)


def find_member_paths(members_dir: str | Path, order: list | None = None) -> list[Path]:
    """Member files in seed order, or in ``order`` (a list of seeds or file paths)."""
    members_dir = Path(members_dir)
    if order:
        paths = [Path(o) if not isinstance(o, int) else member_path(members_dir, o) for o in order]
    else:
        found = [
            (int(m.group(1)), p)
            for p in members_dir.glob("seed=*.ckpt")
            if (m := _SEED_FILE.match(p.name))
        ]
        paths = [p for _, p in sorted(found)]
    if not paths:
        raise FileNotFoundError(
            f"no members in {str(members_dir)!r}; train some first: python train.py -m seed=0,1,2"
        )
    return paths


def load_ensemble(members_dir: str | Path, order: list | None = None) -> list[Member]:
    """Load members and check they can be averaged (same classes, same data)."""
    members = [load_member(p) for p in find_member_paths(members_dir, order)]
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
