"""Torchvision v2 pipelines without v2's per-call dispatch: the same tensors, and the same
random draws, at a fraction of the cost.

A v2 transform finds the kernel for its input at every call by flattening the input as a
pytree and looking its type up in a registry. On a 32×32 image that bookkeeping is most of
the cost: the CIFAR evaluation pipeline (ToImage, Resize, CenterCrop, ToDtype, Normalize)
takes about 0.4 ms per image on one CPU thread, its kernels called directly about 0.18 ms.
A server pays it for every request in its HTTP process, ``infer.py`` and calibration for
every image, and training for every sample of every epoch (in the main process:
``data.num_workers`` is 0 on a 2-core machine). :func:`as_kernels` turns a pipeline into a
:class:`KernelPipeline`:

- the deterministic transforms flexens' data modules use call their kernels directly, with
  the arguments the transform would pass, so the output equals the pipeline's bit for bit;
- any other transform that keeps v2's own ``forward`` (the random crops and flips among
  them) runs as that ``forward`` does on one image, minus the pytree: the same input
  checks, the same coin flip, ``make_params`` then ``transform``. Its draws on torch's
  global RNG are the same calls in the same order, so a seeded run augments exactly as
  before and leaves the RNG in the same state.

A pipeline holding a transform with its own ``forward`` (``RandomApply``, ``RandomChoice``,
...) is not converted, and callers keep it as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import PIL.Image
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2._transform import Transform, _RandomApplyTransform


def _to_plain_image(image: Any) -> torch.Tensor:
    """``v2.ToImage``'s conversion (PIL, ndarray or tensor to C×H×W) as a plain tensor:
    ``F.to_image`` without its final wrapping into a ``tv_tensors.Image``."""
    if isinstance(image, PIL.Image.Image):
        return F.pil_to_tensor(image)
    return F.to_image(image).as_subclass(torch.Tensor)


@dataclass(frozen=True)
class KernelPipeline:
    """The calls a pipeline makes on one image, in order: kernels, or a transform's own
    ``make_params`` and ``transform``. It pickles whenever its transforms do (a
    ``v2.Lambda``'s function may not), so a DataLoader can send it to worker processes."""

    steps: tuple[tuple[Callable, dict], ...]
    transform: Callable
    """The pipeline it was made from: what runs on a non-tensor input (a PIL image) when the
    steps do not start with ``ToImage``, since kernels take tensors only."""

    @property
    def starts_with_to_image(self) -> bool:
        return bool(self.steps) and self.steps[0][0] is _to_plain_image

    def __call__(self, image: Any) -> torch.Tensor:
        if not isinstance(image, torch.Tensor) and not self.starts_with_to_image:
            return self.transform(image)
        for kernel, kwargs in self.steps:
            image = kernel(image, **kwargs)
        return image


def _steps(transform: Any) -> list[tuple[Callable, dict]] | None:
    """The calls ``transform`` makes on one image, or None if it is not convertible."""
    kind = type(transform)
    if kind is v2.Compose:
        steps: list[tuple[Callable, dict]] = []
        for inner in transform.transforms:
            inner_steps = _steps(inner)
            if inner_steps is None:
                return None
            steps.extend(inner_steps)
        return steps
    if kind is v2.ToImage:
        return [(_to_plain_image, {})]
    if kind is v2.Resize:
        kwargs = {
            "size": transform.size,
            "interpolation": transform.interpolation,
            "max_size": transform.max_size,
            "antialias": transform.antialias,
        }
        return [(F.resize_image, kwargs)]
    if kind is v2.CenterCrop:
        return [(F.center_crop_image, {"output_size": list(transform.size)})]
    if kind is v2.ToDtype and isinstance(transform.dtype, torch.dtype):
        return [(F.to_dtype_image, {"dtype": transform.dtype, "scale": transform.scale})]
    if kind is v2.Normalize and all(transform.std):
        return [(_Normalize(tuple(transform.mean), tuple(transform.std), transform.inplace), {})]
    if kind is v2.Lambda and any(issubclass(torch.Tensor, t) for t in transform.types):
        return [(transform.lambd, {})]
    if (
        isinstance(transform, Transform)
        and kind.forward in _BASE_FORWARDS
        and torch.Tensor in transform._transformed_types
    ):
        return [(_OneImage(transform), {})]
    return None


_BASE_FORWARDS = (Transform.forward, _RandomApplyTransform.forward)
"""The ``forward`` methods :class:`_OneImage` reproduces; a transform overriding them may
do anything, and stays in its pipeline. So does one that transforms only some tensor
types: after ``ToImage`` the pipeline holds a ``tv_tensors.Image``, here a plain tensor."""


class _OneImage:
    """A v2 transform applied to a single image as its ``forward`` applies it, without
    flattening the input as a pytree: the input check, the ``p`` coin flip of a random-apply
    transform, whether the input is of a type it transforms, ``make_params``, ``transform``."""

    def __init__(self, transform: Transform) -> None:
        self.transform = transform

    def __call__(self, image: Any) -> Any:
        t = self.transform
        t.check_inputs([image])
        if isinstance(t, _RandomApplyTransform) and torch.rand(1) >= t.p:
            return image
        if not t._needs_transform_list([image])[0]:
            return image
        return t.transform(image, t.make_params([image]))


class _Normalize:
    """``F.normalize_image`` with its mean and std made tensors once per dtype and device,
    not at every call (half its cost on a small image); the arithmetic is the kernel's."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], inplace: bool) -> None:
        self.mean, self.std, self.inplace = mean, std, inplace
        self._stats: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if not image.is_floating_point():  # the kernel's own checks, its own messages
            raise TypeError(f"Input tensor should be a float tensor. Got {image.dtype}.")
        if image.ndim < 3:
            raise ValueError(
                f"Expected tensor to be a tensor image of size (..., C, H, W). Got {image.shape}."
            )
        key = (image.dtype, image.device)
        if key not in self._stats:
            as_column = {"dtype": image.dtype, "device": image.device}
            self._stats[key] = (
                torch.as_tensor(self.mean, **as_column).view(-1, 1, 1),
                torch.as_tensor(self.std, **as_column).view(-1, 1, 1),
            )
        mean, std = self._stats[key]
        image = image.sub_(mean) if self.inplace else image.sub(mean)
        return image.div_(std)


def as_kernels(transform: Any) -> KernelPipeline | None:
    """``transform`` without v2's dispatch, or None when it holds a transform with its own
    ``forward`` (the caller then runs ``transform`` itself)."""
    steps = _steps(transform)
    return None if steps is None else KernelPipeline(tuple(steps), transform)


def fast_transform(transform: Callable) -> Callable:
    """``transform`` without v2's dispatch where :func:`as_kernels` can, else itself."""
    return as_kernels(transform) or transform
