"""ImageFolder trees (CIFAR-10 as shipped in ``shared/``, ImageNet, anything alike).

Small-image trees (CIFAR) can be decoded once into a uint8 tensor cached under
``outputs/cache``: decoding 60,000 JPEGs every epoch would cost more than the network.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.transforms import v2

from flexens.artifacts import fingerprint, torch_save
from flexens.data.base import EnsembleDataModule
from flexens.data.kernels import fast_transform

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def check_image_tree(root: Path, split: str) -> Path:
    """The split folder, or a one-line error naming what is missing and how to fix it."""
    if not root.is_dir():
        raise FileNotFoundError(
            f"data root {str(root)!r} does not exist; pass data.root=/path/to/tree "
            "(or set FLEXENS_CIFAR10_ROOT for data=cifar10)"
        )
    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(
            f"split folder {str(folder)!r} is missing; the tree needs {split}/<class>/<image> "
            "(set data.train_split / data.test_split if it is named differently)"
        )
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(
            f"no class folders in {str(folder)!r}; expected {split}/<class>/<image>"
        )
    for c in classes:
        if not any(f.is_file() for f in c.iterdir()):
            raise FileNotFoundError(
                f"class folder {str(c)!r} is empty; add its images or remove the folder"
            )
    return folder


class DecodedImages(Dataset):
    """A uint8 image tensor with labels, transformed per sample on access."""

    def __init__(self, images: torch.Tensor, targets: list[int], transform) -> None:
        self.images, self.targets = images, targets
        self.transform = fast_transform(transform)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.targets[i]


class ImageFolderDataModule(EnsembleDataModule):
    """``root/{train_split,test_split}/<class>/<image>``.

    ``preset`` picks the transforms: ``cifar`` (pad-4 random crop + flip at ``image_size``)
    or ``imagenet`` (RandomResizedCrop + flip for training; Resize(256/224·size) + CenterCrop
    for evaluation).
    """

    def __init__(
        self,
        root: str,
        name: str = "imagefolder",
        train_split: str = "train",
        test_split: str = "val",
        preset: str = "imagenet",
        image_size: int = 224,
        cache_decoded: bool = False,
        cache_dir: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(name=name, **kwargs)
        if preset not in ("cifar", "imagenet"):
            raise ValueError(f"unknown data.preset {preset!r}; use cifar or imagenet")
        self.root = Path(root).expanduser()
        self.train_split, self.test_split = train_split, test_split
        self.preset, self.image_size = preset, image_size
        self.cache_decoded = cache_decoded
        self.cache_dir = Path(cache_dir) if cache_dir else None

    # -- transforms ---------------------------------------------------------------------
    def _mean_std(self):
        return (CIFAR_MEAN, CIFAR_STD) if self.preset == "cifar" else (IMAGENET_MEAN, IMAGENET_STD)

    def decode_stages(self) -> list:
        """The deterministic head every image goes through first; ``cache_decoded`` stores
        its output, so both paths then apply the very same random and tensor stages.

        ``cifar`` fits images to ``image_size`` here (a no-op on 32×32 CIFAR); ``imagenet``
        keeps the decoded pixels, because RandomResizedCrop must see the whole image.
        """
        if self.preset == "cifar":
            return [v2.ToImage(), v2.Resize(self.image_size, antialias=True),
                    v2.CenterCrop(self.image_size)]  # fmt: skip
        return [v2.ToImage()]

    def tensor_stages(self, augment: bool) -> list:
        """What follows the decode head: augmentation (training) or the evaluation crop, then
        float conversion and normalisation."""
        mean, std = self._mean_std()
        tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        if self.preset == "cifar":
            crop = [v2.RandomCrop(self.image_size, padding=4), v2.RandomHorizontalFlip()]
            return [*crop, *tail] if augment else tail
        if augment:
            crop = [
                v2.RandomResizedCrop(self.image_size, antialias=True),
                v2.RandomHorizontalFlip(),
            ]
        else:
            resize = int(round(self.image_size * 256 / 224))
            crop = [v2.Resize(resize, antialias=True), v2.CenterCrop(self.image_size)]
        return [*crop, *tail]

    def train_transform(self) -> v2.Compose:
        return v2.Compose([*self.decode_stages(), *self.tensor_stages(augment=True)])

    def eval_transform(self) -> v2.Compose:
        return v2.Compose([*self.decode_stages(), *self.tensor_stages(augment=False)])

    def image_transform(self) -> v2.Compose:
        """What an unlabelled image file goes through at inference."""
        return self.eval_transform()

    def eval_transform_description(self) -> str:
        return repr(self.eval_transform())

    # -- datasets -----------------------------------------------------------------------
    def _folder(self, split: str) -> datasets.ImageFolder:
        check_image_tree(self.root, split)
        return datasets.ImageFolder(str(self.root / split))

    def _decoded(self, folder: datasets.ImageFolder, split: str) -> torch.Tensor:
        """All images of a split after the decode head, as one uint8 tensor, cached by the
        head and the file list's fingerprint."""
        decode = v2.Compose(self.decode_stages())
        key = fingerprint([split, repr(decode), *(self._rel(p) for p, _ in folder.samples)])
        path = (self.cache_dir or self.root) / "decoded" / f"{self.name}-{split}-{key}.pt"
        if path.exists():
            return torch.load(path, weights_only=True)
        images = [decode(folder.loader(p)) for p, _ in folder.samples]
        sizes = {tuple(i.shape) for i in images}
        if len(sizes) > 1:
            raise ValueError(
                f"data.cache_decoded=true needs images of one size under {self.root / split}, "
                f"found {len(sizes)} (e.g. {sorted(sizes)[:2]}); set data.cache_decoded=false"
            )
        stacked = torch.stack(images)
        torch_save(path, stacked)
        return stacked

    def _rel(self, path: str) -> str:
        """Path relative to the root; a prefix cut, since ``os.path.relpath`` costs seconds
        over 60,000 files and these paths all start with the root ImageFolder was given."""
        prefix = str(self.root) + os.sep
        return path[len(prefix) :] if path.startswith(prefix) else os.path.relpath(path, self.root)

    def build(self):
        train = self._folder(self.train_split)
        test = self._folder(self.test_split)
        if train.classes != test.classes:
            raise ValueError(
                f"class folders differ between {self.train_split}/ and {self.test_split}/: "
                f"{train.classes} vs {test.classes}"
            )
        self._classes = train.classes
        self._targets = list(train.targets)
        self._ids = [self._rel(p) for p, _ in train.samples]
        self._fingerprint = fingerprint(
            [*self._ids, *(self._rel(p) for p, _ in test.samples), *self._file_sizes(train)]
        )
        if self.cache_decoded:
            train_images = self._decoded(train, self.train_split)
            test_images = self._decoded(test, self.test_split)
            return (
                DecodedImages(train_images, self._targets, self._after_decode(True)),
                DecodedImages(train_images, self._targets, self._after_decode(False)),
                DecodedImages(test_images, list(test.targets), self._after_decode(False)),
            )
        plain = datasets.ImageFolder(
            str(self.root / self.train_split), transform=fast_transform(self.eval_transform())
        )
        train.transform = fast_transform(self.train_transform())
        test.transform = fast_transform(self.eval_transform())
        return train, plain, test

    def _after_decode(self, augment: bool) -> v2.Compose:
        return v2.Compose(self.tensor_stages(augment))

    @staticmethod
    def _file_sizes(folder: datasets.ImageFolder) -> list[int]:
        return [os.path.getsize(p) for p, _ in folder.samples]

    @property
    def train_targets(self):
        return self._targets

    @property
    def class_names(self) -> list[str]:
        self.setup()
        return list(self._classes)

    @property
    def in_chans(self) -> int:
        return 3

    def sample_ids(self):
        return self._ids

    def data_fingerprint(self) -> str:
        self.setup()
        return self._fingerprint
