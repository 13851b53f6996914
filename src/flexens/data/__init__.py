"""Data modules with a deterministic held-out calibration split."""

from flexens.data.base import EnsembleDataModule, calibration_split
from flexens.data.digits import DigitsDataModule
from flexens.data.imagefolder import ImageFolderDataModule, check_image_tree

__all__ = [
    "DigitsDataModule",
    "EnsembleDataModule",
    "ImageFolderDataModule",
    "calibration_split",
    "check_image_tree",
]
