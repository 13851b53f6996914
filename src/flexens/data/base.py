"""The contract every flexens data module keeps: a held-out calibration split.

Members train on ``train`` minus ``calib``; calibration (and the validation monitor during
training) sees only ``calib``; the test split is for evaluation only. The split depends on
``split_seed`` alone, never on the member seed, so every member of an ensemble holds out the
very same samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytorch_lightning as L
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset

from flexens.artifacts import fingerprint


def calibration_split(
    targets: Sequence[int], calib_fraction: float, split_seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, deterministic (train indices, calibration indices), both sorted."""
    if not 0 < calib_fraction < 1:
        raise ValueError(
            f"data.calib_fraction must be in (0, 1), got {calib_fraction}; e.g. data.calib_fraction=0.1"
        )
    indices = np.arange(len(targets))
    train, calib = train_test_split(
        indices, test_size=calib_fraction, random_state=split_seed, stratify=np.asarray(targets)
    )
    return np.sort(train), np.sort(calib)


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 32-bit seed for (member seed, epoch): what epoch ``epoch`` of member
    ``seed`` draws from, whether the run got there in one go or was resumed."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class EpochShuffle(RandomSampler):
    """A shuffle that depends on (seed, epoch) alone, so a resumed member sees the very
    batches an uninterrupted one sees.

    ``RandomSampler`` draws each epoch's order from the global RNG, whose state a resumed
    run does not have. Lightning calls :meth:`set_epoch` before every training epoch; the
    order is drawn when iteration starts, so it follows the latest ``set_epoch``. Under DDP
    Lightning swaps it (a ``RandomSampler``) for a ``DistributedSampler`` seeded by the
    member seed, which is epoch-seeded the same way.
    """

    def __init__(self, data_source: Dataset, seed: int, epoch: int = 0) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


class EnsembleDataModule(L.LightningDataModule):
    """Shared split logic; subclasses build the three datasets in :meth:`build`.

    ``build`` returns ``(train_augmented, train_plain, test)``: the first two index the same
    training samples, with and without augmentation (calibration must not see augmented
    images).

    ``shuffle_seed`` seeds the training order (:class:`EpochShuffle`); ``train.py`` sets it
    to the member seed.
    """

    name: str = "data"

    def __init__(
        self,
        name: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        calib_fraction: float = 0.1,
        split_seed: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        shuffle_seed: int = 0,
    ) -> None:
        super().__init__()
        if name is not None:
            self.name = name
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.calib_fraction = calib_fraction
        self.split_seed = split_seed
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.shuffle_seed = shuffle_seed
        self._built = False

    # -- subclass API -----------------------------------------------------------------
    def build(self) -> tuple[Dataset, Dataset, Dataset]:
        raise NotImplementedError

    @property
    def train_targets(self) -> Sequence[int]:
        raise NotImplementedError

    @property
    def class_names(self) -> list[str]:
        raise NotImplementedError

    @property
    def in_chans(self) -> int:
        raise NotImplementedError

    def sample_ids(self) -> Sequence:
        """Stable identity of each training sample (file path, or index)."""
        return range(len(self.train_targets))

    def data_fingerprint(self) -> str:
        raise NotImplementedError

    def image_transform(self):
        """PIL image → model input, for ``infer.py input=...``."""
        raise NotImplementedError

    def eval_transform_description(self) -> str:
        """What the evaluation transform does, part of the logit cache key."""
        raise NotImplementedError

    # -- Lightning hooks ----------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._built:
            return
        self.train_augmented, self.train_plain, self.test_set = self.build()
        self.train_indices, self.calib_indices = calibration_split(
            self.train_targets, self.calib_fraction, self.split_seed
        )
        self._built = True

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def calib_fingerprint(self) -> str:
        self.setup()
        ids = self.sample_ids()
        return fingerprint([self.data_fingerprint(), *(ids[i] for i in self.calib_indices)])

    @property
    def calib_set(self) -> Dataset:
        self.setup()
        return Subset(self.train_plain, self.calib_indices.tolist())

    def _loader(
        self, dataset: Dataset, batch_size: int, sampler=None, drop_last: bool = False
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            drop_last=drop_last,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented training batches, in an order fixed by (seed, epoch).

        The sampler starts at the trainer's current epoch: a resumed run can create the
        iterator before Lightning calls ``set_epoch`` (with worker processes, which fetch
        indices at once). A last batch of a single sample is dropped (a different one each
        epoch): BatchNorm cannot train on one sample, and e.g. 673 images in batches of 16
        leave exactly one.
        """
        train = Subset(self.train_augmented, self.train_indices.tolist())
        lone = len(train) % self.batch_size == 1 and len(train) > 1
        trainer = self.trainer
        epoch = trainer.current_epoch if trainer is not None else 0
        sampler = EpochShuffle(train, self.shuffle_seed, epoch)
        return self._loader(train, self.batch_size, sampler=sampler, drop_last=lone)

    def val_dataloader(self) -> DataLoader:
        return self.calib_dataloader()

    def calib_dataloader(self) -> DataLoader:
        return self._loader(self.calib_set, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_set, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def describe(self) -> dict:
        self.setup()
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "in_chans": self.in_chans,
            "fingerprint": self.data_fingerprint(),
            "calib_fingerprint": self.calib_fingerprint(),
            "train_size": len(self.train_indices),
            "calib_size": len(self.calib_indices),
            "test_size": len(self.test_set),
        }
