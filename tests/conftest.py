"""Shared fixtures: a tiny trained digits ensemble, made once per test session."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

from flexens.members.networks import SmallConvNet

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("FLEXENS_ROOT", str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("FLEXENS_PROFILE_SECONDS", "2")  # toy members: a 2 s latency profile


def run_script(
    script: str, *overrides: str, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run an entry point as a user would, from the project folder."""
    env = {**os.environ, "FLEXENS_ROOT": str(ROOT), "HYDRA_FULL_ERROR": "0", **(env or {})}
    result = subprocess.run(
        [sys.executable, str(ROOT / script), *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{script} {' '.join(overrides)} failed:\n{result.stdout}\n{result.stderr}"
        )
    return result


@pytest.fixture(scope="session")
def digits_ensemble(tmp_path_factory) -> Path:
    """Three small digits members trained by the real entry point; returns the output dir."""
    out = tmp_path_factory.mktemp("outputs")
    run_script(
        "train.py",
        "-m",
        "seed=0,1,2",
        f"paths.output_dir={out}",
        "logger=csv",
        "trainer.max_epochs=3",
        "train.progress_bar=false",
        "model.kwargs.width=8",
    )
    return out


# -- tiny image trees ----------------------------------------------------------------------
TREE_IMAGE_KINDS = (
    ("RGB", ".JPEG"),  # ImageNet's own suffix
    ("L", ".jpg"),  # grayscale
    ("P", ".png"),  # palette
    ("RGBA", ".png"),
    ("CMYK", ".jpg"),
    ("RGB", ".png"),  # a PNG among JPEGs
    ("RGB", ".jpg"),
    ("L", ".png"),
)
TREE_SIZES = ((40, 30), (24, 36), (70, 64), (33, 33), (96, 80))


def make_image_tree(
    root: Path,
    splits: tuple[str, ...] = ("train", "val"),
    classes: tuple[str, ...] = ("n01", "n02", "n03"),
    per_split: dict[str, int] | None = None,
) -> Path:
    """An ImageNet-layout tree ``root/<split>/<class>/<image>`` of odd little images.

    Every PIL mode a real tree holds shows up (RGB, grayscale, palette, RGBA, CMYK), in
    JPEG and PNG, at varying sizes; each class has its own tint so members can learn a little.
    """
    import numpy as np
    from PIL import Image

    per_split = {"train": 8, **(per_split or {})}
    rng = np.random.default_rng(0)
    for split in splits:
        count = per_split.get(split, 4)
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                mode, suffix = TREE_IMAGE_KINDS[(i + c) % len(TREE_IMAGE_KINDS)]
                w, h = TREE_SIZES[(i + 2 * c) % len(TREE_SIZES)]
                pixels = rng.integers(0, 96, (h, w, 3), dtype=np.uint8)
                pixels[..., c % 3] += 128  # the class tint
                image = Image.fromarray(pixels, "RGB")
                image = image.quantize(16) if mode == "P" else image.convert(mode)
                image.save(folder / f"img{i}{suffix}", format="PNG" if suffix == ".png" else "JPEG")
    return root


def small_members(count: int = 4, seed: int = 0) -> list[torch.nn.Module]:
    """Tiny ``SmallConvNet`` members in eval mode, as trained ones: BatchNorm not identity."""
    torch.manual_seed(seed)
    nets = [SmallConvNet(num_classes=10, in_chans=3, width=4, depth=2) for _ in range(count)]
    for net in nets:  # non-trivial BatchNorm statistics, as in trained members
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return [n.eval() for n in nets]


@pytest.fixture
def one_thread(monkeypatch: pytest.MonkeyPatch):
    """One thread, and no trace of in-process runs left for the tests after these.

    Toy tensors gain nothing from threads, and on a busy 2-core machine a second OpenMP
    thread that waits for a core makes every op ~40x slower; child processes inherit this.
    ``seed_everything`` in an in-process run exports its seed for Lightning's child processes.
    """
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for key in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        monkeypatch.setenv(key, "0")
        monkeypatch.delenv(key)  # so teardown removes what train_member sets
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- W&B offline runs, read from their files ------------------------------------------------
def wandb_records(path: Path) -> list:
    """The protobuf records of a W&B transaction log (``run-<id>.wandb``).

    The file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks, each
    ``crc32 (uint32), length (uint16), type (uint8: 1 full, 2 first, 3 middle, 4 last)``
    and its data, the crc seeded with the crc of the type byte. wandb itself no longer ships
    a reader, so the tests read it with wandb's own protobuf schema.
    """
    from wandb.proto.wandb_internal_pb2 import Record

    data, records, pending, i = path.read_bytes(), [], b"", 7
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    while i + 7 <= len(data):
        if 32768 - i % 32768 < 7:  # block trailer: zero padding
            i += 32768 - i % 32768
            continue
        crc, length, kind = struct.unpack("<IHB", data[i : i + 7])
        chunk = data[i + 7 : i + 7 + length]
        i += 7 + length
        if kind == 0:
            continue
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad chunk"
        pending += chunk
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_offline_run(log: Path) -> dict:
    """One offline run: its id, exit code (None if never finished) and config."""
    records = wandb_records(log)
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "run" in kinds, f"{log} holds no run record (yet)"
    exits = [r.exit.exit_code for r, kind in zip(records, kinds, strict=True) if kind == "exit"]
    config = {
        item.key: json.loads(item.value_json)
        for r, kind in zip(records, kinds, strict=True)
        if kind == "config"
        for item in r.config.update
    }
    run_id = records[kinds.index("run")].run.run_id
    return {"id": run_id, "exit_code": exits[-1] if exits else None, "config": config}


def wandb_offline_runs(folder: Path, wait_s: float = 30.0) -> list[dict]:
    """Every offline run under ``folder``, once all are finished (or after ``wait_s``).

    wandb's core process writes the log after ``wandb.finish`` returns, so a run finished
    in this process may still be incomplete on disk for a moment.
    """
    logs = sorted(folder.glob("**/wandb/offline-run-*/run-*.wandb"))
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            runs = [wandb_offline_run(log) for log in logs]
        except Exception:  # a chunk or record still being written (crc, protobuf decode)
            runs = None
        if runs is not None and all(r["exit_code"] is not None for r in runs):
            return runs
        time.sleep(0.2)
    return [wandb_offline_run(log) for log in logs]
