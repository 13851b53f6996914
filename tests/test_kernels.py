"""Transform pipelines run as their kernels: bit for bit what the v2 pipelines give."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from flexens.data import DigitsDataModule, ImageFolderDataModule
from flexens.data.kernels import KernelPipeline, as_kernels, fast_transform


def _photo(size: tuple[int, int], seed: int, mode: str = "RGB") -> Image.Image:
    """Smooth colour with noise, like a photo, so that resizing has real work to do."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize(size, Image.BICUBIC)).astype(int)
    noisy = smooth + rng.integers(0, 40, (size[1], size[0], 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).convert(mode)


def _pipelines() -> dict[str, v2.Compose]:
    cifar = ImageFolderDataModule(root="unused", preset="cifar", image_size=32)
    imagenet = ImageFolderDataModule(root="unused", preset="imagenet", image_size=32)
    return {
        "cifar": cifar.image_transform(),
        "imagenet": imagenet.image_transform(),  # resizes 50×40 to 37 then crops 32
        "digits": DigitsDataModule().image_transform(),  # holds a v2.Lambda
    }


@pytest.mark.parametrize("name", ["cifar", "imagenet", "digits"])
def test_kernels_give_the_pipelines_output_bit_for_bit(name: str) -> None:
    pipeline = _pipelines()[name]
    kernels = as_kernels(pipeline)
    assert isinstance(kernels, KernelPipeline) and kernels.starts_with_to_image
    for seed, size in enumerate([(32, 32), (50, 40), (17, 61)]):
        image = _photo(size, seed, "L" if name == "digits" else "RGB")
        expected, got = pipeline(image), kernels(image)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert torch.equal(got, expected.as_subclass(torch.Tensor))


def test_tensor_stages_of_decoded_images_convert_too() -> None:
    """The cached-decode path feeds uint8 tensors to ToDtype + Normalize."""
    stages = v2.Compose(
        ImageFolderDataModule(root="unused", preset="cifar").tensor_stages(augment=False)
    )
    pixels = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    assert torch.equal(as_kernels(stages)(pixels), stages(pixels))


@pytest.mark.parametrize("preset", ["cifar", "imagenet"])
def test_training_augmentation_draws_and_augments_exactly_as_v2(preset: str) -> None:
    """Random crops and flips run without the pytree but with the very same draws on torch's
    global RNG: a seeded sequence of samples is identical, and so is the RNG afterwards."""
    data = ImageFolderDataModule(root="unused", preset=preset, image_size=32)
    pipelines = {
        "decoded split": (v2.Compose(data.tensor_stages(augment=True)), "tensor"),
        "image files": (data.train_transform(), "pil"),
    }
    for name, (pipeline, kind) in pipelines.items():
        fast = as_kernels(pipeline)
        assert fast is not None, name
        images = [_photo((50, 40), seed) for seed in range(4)]
        if kind == "tensor":
            images = [v2.functional.pil_to_tensor(i) for i in images]
        outputs = {}
        for form, run in (("v2", pipeline), ("fast", fast)):
            torch.manual_seed(0)
            outputs[form] = [run(image) for image in images * 8]
            outputs[form].append(torch.rand(3))  # the RNG's state after the samples
        for expected, got in zip(outputs["v2"], outputs["fast"], strict=True):
            assert torch.equal(got, expected.as_subclass(torch.Tensor)), name


def test_transforms_with_their_own_forward_are_left_alone_and_errors_stay_v2s() -> None:
    choice = v2.Compose([v2.ToImage(), v2.RandomApply([v2.Grayscale(3)], p=0.5)])
    assert as_kernels(choice) is None  # RandomApply overrides forward: anything may happen
    assert fast_transform(choice) is choice
    only_tv_tensors = v2.Compose([v2.ToImage(), v2.ToPureTensor()])  # skips plain tensors
    assert as_kernels(only_tv_tensors) is None
    zero_std = v2.Normalize([0.5], [0.0])
    with pytest.raises(ValueError, match="std evaluated to zero"):
        as_kernels(zero_std)(torch.rand(1, 4, 4))  # at call time, as v2 raises it
    grey = v2.Compose([v2.ToImage(), v2.Grayscale(3)])  # keeps v2's forward: converted
    image = _photo((20, 20), 0)
    assert torch.equal(as_kernels(grey)(image), grey(image))


def test_kernel_pipeline_pickles_for_dataloader_workers() -> None:
    kernels = as_kernels(_pipelines()["cifar"])
    image = _photo((32, 32), 0)
    assert torch.equal(pickle.loads(pickle.dumps(kernels))(image), kernels(image))
