"""The LightningModule that trains one member: cross-entropy, accuracy, an LR schedule."""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from flexens.members.networks import create_network


class MemberModule(L.LightningModule):
    """``optimizer`` is a partially-applied optimizer (Hydra ``_partial_: true``).

    ``scheduler`` is ``onecycle``, ``cosine`` or ``none``; both schedules step per batch
    over the whole run, which Lightning tells us via ``estimated_stepping_batches``.
    """

    def __init__(
        self,
        arch: dict,
        optimizer: Callable,
        scheduler: str = "onecycle",
        label_smoothing: float = 0.0,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.arch = dict(arch)
        self.net = create_network(**self.arch)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self._forward = torch.compile(self.net) if compile else self.net
        self.optimizer_factory = optimizer
        num_classes = self.arch["num_classes"]
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._forward(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameters())
        name = self.hparams.scheduler
        if name == "none":
            return optimizer
        steps = int(self.trainer.estimated_stepping_batches)
        if name == "onecycle":
            lr = optimizer.param_groups[0]["lr"]
            sched = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=lr, total_steps=steps, pct_start=0.25
            )
        elif name == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        else:
            raise ValueError(f"unknown train.scheduler {name!r}; use onecycle, cosine or none")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
