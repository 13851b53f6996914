"""Lightning's predict loop on one chosen device, leaving the module where it found it.

Both the calibration's member outputs and ``infer.py``'s accuracy pass run through
``Trainer.predict`` (progress, accelerator handling). Two details make that unsafe to use
as is: ``devices=1`` means the first GPU whatever ``device=cuda:N`` said, and the
strategy's teardown moves the module to the CPU when the loop ends, so timing it next on
the GPU fails ("Input type (torch.cuda.FloatTensor) and weight type (torch.FloatTensor)").
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as L
import torch
from torch.utils.data import DataLoader


def predict_trainer(device: torch.device, progress_bar: bool = True) -> L.Trainer:
    """A quiet Trainer for inference on exactly ``device`` (``cuda:1`` is GPU 1)."""
    gpu = device.type == "cuda"
    return L.Trainer(
        accelerator="gpu" if gpu else "cpu",
        devices=[device.index] if gpu and device.index is not None else 1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress_bar,
    )


def predict_in_place(
    trainer: L.Trainer, module: L.LightningModule, loader: DataLoader
) -> list[Any]:
    """``trainer.predict(module, loader)``, with the module back on its own device after."""
    device = next(module.parameters()).device
    try:
        return trainer.predict(module, dataloaders=loader)
    finally:
        module.to(device)
