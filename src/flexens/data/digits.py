"""scikit-learn's bundled 8×8 digits: the embedded default, no download."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset
from torchvision.transforms import v2

from flexens.artifacts import fingerprint
from flexens.data.base import EnsembleDataModule

TEST_FRACTION = 0.25
TEST_SPLIT_SEED = 0
"""digits ships no test split: this fixed stratified one never changes."""


class DigitsDataModule(EnsembleDataModule):
    name = "digits"

    def build(self):
        bunch = load_digits()
        images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
        images = (images - 0.5) / 0.5
        targets = torch.from_numpy(bunch.target.astype(np.int64))
        train_idx, test_idx = train_test_split(
            np.arange(len(targets)),
            test_size=TEST_FRACTION,
            random_state=TEST_SPLIT_SEED,
            stratify=bunch.target,
        )
        train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
        self._targets = targets[train_idx].tolist()
        self._fingerprint = fingerprint([bunch.images.tobytes(), bunch.target.tobytes()])
        train = TensorDataset(images[train_idx], targets[train_idx])
        test = TensorDataset(images[test_idx], targets[test_idx])
        return train, train, test

    @property
    def train_targets(self):
        return self._targets

    @property
    def class_names(self) -> list[str]:
        return [str(d) for d in range(10)]

    @property
    def in_chans(self) -> int:
        return 1

    def data_fingerprint(self) -> str:
        return self._fingerprint

    def image_transform(self) -> v2.Compose:
        """An image file → the digits format: 8×8 grey, ink high (sklearn digits are ink=16)."""
        return v2.Compose(
            [
                v2.ToImage(),
                v2.Resize(8, antialias=True),
                v2.CenterCrop(8),
                v2.ToDtype(torch.float32, scale=True),
                v2.Lambda(lambda x: 1.0 - x),
                v2.Normalize([0.5], [0.5]),
            ]
        )

    def eval_transform_description(self) -> str:
        return "digits: x/16, normalise(0.5, 0.5)"
