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
    """One member's float32 logits and the batch's labels, for ``Trainer.predict``."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def predict_step(self, batch, batch_idx: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        return self.network(x).float(), torch.as_tensor(y)


def _compute(
    member: Member, loader: DataLoader, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Through Lightning's predict loop: a progress bar over a large split, and the same
    accelerator handling as training."""
    outputs = predict_in_place(predict_trainer(device), MemberLogits(member.network.eval()), loader)
    return torch.cat([o[0] for o in outputs]).cpu(), torch.cat([o[1] for o in outputs]).cpu()


def member_logits(
    member: Member,
    loader: DataLoader,
    device: torch.device,
    cache_dir: str | Path,
    split_fingerprint: str,
    transform: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits (S, C), labels (S,))`` of one member on one split, from cache if valid."""
    key_fields = {
        "member_sha256": member.sha256,
        "network_form": INFERENCE_FORM,
        "split": split_fingerprint,
        "transform": transform,
    }
    path = Path(cache_dir) / "logits" / f"{fingerprint(key_fields.values())}.pt"
    if path.exists():
        try:
            entry = torch.load(path, map_location="cpu")
            if entry.get("key") == key_fields:
                return entry["logits"], entry["labels"]
            log.warning("logit cache %s belongs to other checkpoints or data; rebuilding it", path)
        except Exception as err:  # a truncated or foreign file: rebuild, never trust
            log.warning("logit cache %s is unreadable (%s); rebuilding it", path, err)
    logits, labels = _compute(member, loader, device)
    bad = (~torch.isfinite(logits)).any(dim=1)
    if bad.any():
        raise ValueError(
            f"member {member.path.name} produced NaN/Inf outputs for {int(bad.sum())} of "
            f"{len(bad)} samples; retrain it (e.g. lower train.optimizer.lr) or drop it"
        )
    torch_save(path, {"key": key_fields, "logits": logits, "labels": labels})
    return logits, labels


def ensemble_probs(
    members: list[Member],
    loader: DataLoader,
    device: torch.device,
    cache_dir: str | Path,
    split_fingerprint: str,
    transform: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs (N, S, C), labels (S,))`` for all members, labels checked to agree."""
    probs, labels = [], None
    for member in members:
        logits, y = member_logits(member, loader, device, cache_dir, split_fingerprint, transform)
        if labels is not None and not torch.equal(labels, y):
            raise ValueError(
                f"cached labels of {member.path.name} disagree with the other members; "
                f"delete {Path(cache_dir) / 'logits'} and rerun"
            )
        labels = y
        probs.append(logits.softmax(dim=-1))
    return torch.stack(probs), labels


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
