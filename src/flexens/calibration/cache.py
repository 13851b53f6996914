"""Member outputs on a split, computed once and cached on disk.

The key is the checkpoint's hash, the form the network runs in (BatchNorm folded), the
split's fingerprint and the evaluation transform: a λ sweep or a change of criterion never
re-runs the networks, and a retrained member, a changed split or another inference form can
never be served stale logits. Every entry also stores its own key
fields, checked on load, so a damaged or foreign file is rebuilt, not trusted.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as L
import torch
from torch.utils.data import DataLoader

from flexens.artifacts import fingerprint, torch_save
from flexens.members.inference_form import INFERENCE_FORM
from flexens.members.registry import Member
from flexens.predict import predict_in_place, predict_trainer

log = logging.getLogger(__name__)


class MemberLogits(L.LightningModule):
    """Several members' float32 logits and the batch's labels, for ``Trainer.predict``:
    one pass over the data serves them all, so each batch is read and decoded once."""

    def __init__(self, networks: list[torch.nn.Module]) -> None:
        super().__init__()
        self.networks = torch.nn.ModuleList(networks)

    def predict_step(self, batch, batch_idx: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
        x, y = batch
        return [network(x).float() for network in self.networks], torch.as_tensor(y)


def _compute(
    members: list[Member], loader: DataLoader, device: torch.device
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Through Lightning's predict loop: a progress bar over a large split, and the same
    accelerator handling as training."""
    module = MemberLogits([member.network.eval() for member in members])
    outputs = predict_in_place(predict_trainer(device), module, loader)
    logits = [torch.cat([o[0][i] for o in outputs]).cpu() for i in range(len(members))]
    return logits, torch.cat([o[1] for o in outputs]).cpu()


def _read_entry(path: Path, key_fields: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A cache entry's ``(logits, labels)`` if it holds exactly ``key_fields``, else None."""
    if not path.exists():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
        if entry.get("key") == key_fields:
            return entry["logits"], entry["labels"]
        log.warning("logit cache %s belongs to other checkpoints or data; rebuilding it", path)
    except Exception as err:  # a truncated or foreign file: rebuild, never trust
        log.warning("logit cache %s is unreadable (%s); rebuilding it", path, err)
    return None


def members_logits(
    members: list[Member],
    loader: DataLoader,
    device: torch.device,
    cache_dir: str | Path,
    split_fingerprint: str,
    transform: str,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(logits (S, C), labels (S,))`` of each member on one split: valid cache entries are
    read, and every member without one runs in a single pass over ``loader``."""
    keys = [
        {
            "member_sha256": member.sha256,
            "network_form": INFERENCE_FORM,
            "split": split_fingerprint,
            "transform": transform,
        }
        for member in members
    ]
    paths = [Path(cache_dir) / "logits" / f"{fingerprint(key.values())}.pt" for key in keys]
    results = [_read_entry(path, key) for path, key in zip(paths, keys, strict=True)]
    missing = [i for i, result in enumerate(results) if result is None]
    if not missing:
        return results
    logits, labels = _compute([members[i] for i in missing], loader, device)
    for i, out in zip(missing, logits, strict=True):
        bad = (~torch.isfinite(out)).any(dim=1)
        if bad.any():
            raise ValueError(
                f"member {members[i].path.name} produced NaN/Inf outputs for {int(bad.sum())} "
                f"of {len(bad)} samples; retrain it (e.g. lower train.optimizer.lr) or drop it"
            )
        torch_save(paths[i], {"key": keys[i], "logits": out, "labels": labels})
        results[i] = (out, labels)
    return results


def ensemble_probs(
    members: list[Member],
    loader: DataLoader,
    device: torch.device,
    cache_dir: str | Path,
    split_fingerprint: str,
    transform: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs (N, S, C), labels (S,))`` for all members, labels checked to agree."""
    outputs = members_logits(members, loader, device, cache_dir, split_fingerprint, transform)
    labels = outputs[0][1]
    for member, (_, y) in zip(members, outputs, strict=True):
        if not torch.equal(labels, y):
            raise ValueError(
                f"cached labels of {member.path.name} disagree with the other members; "
                f"delete {Path(cache_dir) / 'logits'} and rerun"
            )
    return torch.stack([logits.softmax(dim=-1) for logits, _ in outputs]), labels


def split_probs(
    members: list[Member], datamodule, split: str, device: torch.device, cache_dir: str | Path
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs (N, S, C), labels (S,))`` on the data module's ``calib`` or ``test`` split."""
    if split == "calib":
        loader, split_fp = datamodule.calib_dataloader(), datamodule.calib_fingerprint()
    elif split == "test":
        loader = datamodule.test_dataloader()
        split_fp = fingerprint(["test", datamodule.data_fingerprint()])
    else:
        raise ValueError(f"unknown split {split!r}; use calib or test")
    return ensemble_probs(
        members, loader, device, cache_dir, split_fp, datamodule.eval_transform_description()
    )
