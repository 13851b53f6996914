"""Unlabelled images "in the wild" for inference: find them, decode them, make them fit.

Users point ``infer.py input=...`` at a photo or a folder of them. Such files come in every
PIL mode (palette, alpha, CMYK, 16-bit grayscale, float), and some are corrupt or truncated:
one bad file must cost only its own row, never the whole run. So :func:`load_images` reports
bad files in ``failures`` and goes on with the rest.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import IterableDataset

from flexens.data.kernels import fast_transform

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
"""Lower-case suffixes that :func:`find_images` picks up in a folder (compared case-insensitively)."""


_DECODE_ERRORS: tuple[type[Exception], ...] = (
    OSError,  # UnidentifiedImageError, "image file is truncated", unreadable files
    ValueError,  # unsupported modes, malformed header values
    SyntaxError,  # some PIL plugins raise it for malformed headers
    EOFError,
    Image.DecompressionBombError,  # not an OSError
)
"""What PIL raises for a file that is not a (whole, decodable) image."""


def find_images(path: str | Path, setting: str = "input") -> list[Path]:
    """The image files ``input=`` (or another ``setting``) names: the file itself, or a
    folder's images, sorted.

    A file named explicitly is taken whatever its suffix (the user chose it). A folder is
    searched recursively for :data:`IMAGE_SUFFIXES`, skipping hidden files and folders (such as
    macOS ``._photo.jpg`` resource forks, which carry an image suffix but are no images).
    """
    path = Path(path).expanduser()
    hint = f"pass {setting}=<image file or folder>"
    if path.is_file():
        return [path]
    if not path.exists():
        raise FileNotFoundError(f"{setting} {str(path)!r} does not exist; {hint}")
    if not path.is_dir():
        raise FileNotFoundError(f"{setting} {str(path)!r} is neither a file nor a folder; {hint}")
    found: list[Path] = []

    def unreadable(error: OSError) -> None:  # reported, not silently skipped (os.walk's default)
        print(f"skipped {error.filename}: {_one_line(error)}")

    for folder, dirs, files in os.walk(path, onerror=unreadable):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(
            Path(folder, f)
            for f in files
            if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES
        )
    if not found:
        suffixes = " ".join(sorted(IMAGE_SUFFIXES))
        raise FileNotFoundError(
            f"no images in folder {str(path)!r} (searched recursively for {suffixes}); {hint}"
        )
    return sorted(found)


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float grayscale as 8-bit "L", scaled rather than clipped.

    PIL's own ``convert("L")`` clips, so a 16-bit mid-grey 32768 would turn white. Scaling:
    ``I;16*`` maps 0..65535 onto 0..255. ``I`` (32-bit) whose values fit 0..65535 is 16-bit data
    widened by a decoder and is scaled the same way; other ``I`` data, having no fixed white
    point, is stretched over its own min..max. ``F`` in [0, 1] is scaled by 255, in [0, 255]
    kept, otherwise stretched over its min..max; NaN and infinities become 0.
    """
    values = np.asarray(image).astype(np.float64)
    finite = np.isfinite(values)
    values = np.where(finite, values, 0.0)
    lo = float(values[finite].min()) if finite.any() else 0.0
    hi = float(values[finite].max()) if finite.any() else 0.0
    if image.mode.startswith("I;16") or (image.mode == "I" and lo >= 0 and hi <= 65535):
        values = values / 257.0
    elif image.mode == "F" and lo >= 0 and hi <= 1:
        values = values * 255.0
    elif not (image.mode == "F" and lo >= 0 and hi <= 255):
        values = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def _has_transparency(image: Image.Image) -> bool:
    return "A" in image.getbands() or "transparency" in image.info


def to_model_mode(image: Image.Image, in_chans: int) -> Image.Image:
    """``image`` in the mode the model was trained on: "RGB" for 3 channels, "L" for 1.

    Transparent pixels are composited onto white (what a viewer shows; dropping alpha would
    expose whatever colour hides under it, often black). Plain RGB and L images go through
    PIL's ``convert`` exactly as the training loader does, so they are unchanged.
    """
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3 for image inputs, got {in_chans}")
    target = "RGB" if in_chans == 3 else "L"
    if image.mode == "F" or image.mode == "I" or image.mode.startswith("I;16"):
        return _high_depth_to_l(image).convert(target)
    if _has_transparency(image):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert(target)
    return image if image.mode == target else image.convert(target)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@dataclass
class LoadedImages:
    """The images that loaded, stacked, and the ones that did not, with why."""

    tensors: torch.Tensor
    """N×C×H×W; shape (0,) when no image loaded."""
    paths: list[Path] = field(default_factory=list)
    """The loaded files, in the order of ``tensors``."""
    failures: list[tuple[Path, str]] = field(default_factory=list)
    """(file, one-line reason) for each file that could not be read, decoded or transformed."""


def load_images(
    paths: Sequence[str | Path],
    in_chans: int,
    transform: Callable[[Image.Image], torch.Tensor],
    like: tuple[Path, torch.Tensor] | None = None,
) -> LoadedImages:
    """Decode, convert (:func:`to_model_mode`) and transform each file; skip and report bad ones.

    ``transform`` takes a PIL image and must return a C×H×W tensor of one fixed size for every
    input (e.g. ``v2.Compose([v2.ToImage(), v2.Resize(s), v2.CenterCrop(s), ...])``), since
    images in the wild differ in size and the results are stacked; a transform whose outputs
    differ in shape is a ValueError, not a per-file failure. EXIF orientation is applied, so
    phone photos reach the model upright, as the user sees them. Everything is held in memory:
    for large folders call this on chunks of ``paths`` (:func:`image_batches`), passing an
    earlier chunk's first image as ``like`` so that every chunk has its size.
    """
    transform = fast_transform(transform)
    tensors: list[torch.Tensor] = []
    loaded: list[Path] = []
    failures: list[tuple[Path, str]] = []
    for raw in paths:
        path = Path(raw)
        try:
            image = _open(path, in_chans)
        except _DECODE_ERRORS as error:
            failures.append((path, _one_line(error)))
            continue
        try:
            tensor = transform(image)
        except Exception as error:  # a data-dependent transform failure costs one file only
            failures.append((path, f"transform failed: {_one_line(error)}"))
            continue
        _check_output(tensor, path, in_chans, (loaded[0], tensors[0]) if tensors else like)
        tensors.append(tensor)
        loaded.append(path)
    stacked = torch.stack(tensors) if tensors else torch.empty(0)
    return LoadedImages(tensors=stacked, paths=loaded, failures=failures)


def image_batches(
    source: str | Path,
    in_chans: int,
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int,
    paths: list[Path] | None = None,
) -> Iterator[LoadedImages]:
    """What ``input=`` names, decoded ``batch_size`` files at a time, so that a folder of any
    size costs one batch of memory: each unreadable file is reported on one line and skipped
    (its batch comes out smaller; a batch of none is not yielded), and when none at all could
    be read, a one-line error follows the last batch. ``paths``: the files of ``source``
    where the caller has found them already (:func:`find_images`)."""
    paths = find_images(source) if paths is None else paths
    first: tuple[Path, torch.Tensor] | None = None
    for start in range(0, len(paths), batch_size):
        loaded = load_images(paths[start : start + batch_size], in_chans, transform, first)
        for path, reason in loaded.failures:
            print(f"skipped {path}: {reason}")
        if loaded.paths:
            first = first or (loaded.paths[0], loaded.tensors[0])
            yield loaded
    if first is None:
        raise ValueError(f"none of the {len(paths)} image(s) under {str(source)!r} could be read")


class UnlabelledBatches(IterableDataset):
    """:func:`image_batches` over ``paths`` (the images of folder ``source``) as a dataset of
    ``(images, zeros)`` batches, for ``DataLoader(dataset, batch_size=None)``: a folder of
    any size is decoded one batch at a time, each time the loader is read
    (``calibrate.unlabelled=``)."""

    def __init__(
        self,
        source: str | Path,
        paths: list[Path],
        in_chans: int,
        transform: Callable[[Image.Image], torch.Tensor],
        batch_size: int,
    ) -> None:
        self.source, self.paths, self.in_chans = source, paths, in_chans
        self.transform, self.batch_size = transform, batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for loaded in image_batches(
            self.source, self.in_chans, self.transform, self.batch_size, self.paths
        ):
            yield loaded.tensors, torch.zeros(len(loaded.paths), dtype=torch.long)


def _open(source: Path | io.BytesIO, in_chans: int, max_pixels: int | None = None) -> Image.Image:
    """Decode one image into the model's mode; refuse more than ``max_pixels`` from the header."""
    with Image.open(source) as opened:
        if max_pixels is not None and opened.width * opened.height > max_pixels:
            raise ImageTooLarge(
                f"image too large: {opened.width}×{opened.height} pixels, over the limit of "
                f"{max_pixels:,}; send a smaller image"
            )
        opened.load()
        return to_model_mode(ImageOps.exif_transpose(opened), in_chans)


class ImageRejected(ValueError):
    """Bytes that are not a usable image; the message is the one-line reason."""


class ImageTooLarge(ImageRejected):
    """An image whose header declares more pixels than allowed (a decompression bomb)."""


def decode_image(
    data: bytes,
    in_chans: int,
    transform: Callable[[Image.Image], torch.Tensor],
    max_pixels: int,
) -> torch.Tensor:
    """One image from raw bytes (a server request), decoded as :func:`load_images` decodes files.

    A server must refuse a bad body without harm: the pixel count is checked from the header
    before a single pixel is decoded, so a 20,000 × 20,000 PNG of a few kilobytes costs no
    memory. Every failure is an :class:`ImageRejected` with a one-line reason. A server
    passes ``transform`` through :func:`flexens.data.kernels.fast_transform` once, not here
    for every request.
    """
    if not data:
        raise ImageRejected("empty body; send the bytes of an image file")
    try:
        image = _open(io.BytesIO(data), in_chans, max_pixels)
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected("not an image: no image format recognised in the body") from None
    except Image.DecompressionBombError as error:
        raise ImageTooLarge(f"image too large: {_one_line(error)}") from None
    except _DECODE_ERRORS as error:
        raise ImageRejected(f"not a readable image: {_one_line(error)}") from None
    try:
        tensor = transform(image)
    except Exception as error:  # data-dependent transform failures reject one request
        raise ImageRejected(f"transform failed: {_one_line(error)}") from None
    _check_output(tensor, Path("<request body>"), in_chans, None)
    return tensor


def _check_output(
    tensor: object, path: Path, in_chans: int, first: tuple[Path, torch.Tensor] | None
) -> None:
    """Fail fast, naming the files, when the transform cannot feed the model a batch."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(
            f"the input transform must return a tensor, got {type(tensor).__name__} for "
            f"{str(path)!r}; start it with v2.ToImage()"
        )
    if tensor.ndim != 3 or tensor.shape[0] != in_chans:
        raise ValueError(
            f"the input transform must return {in_chans}×H×W tensors, got "
            f"{tuple(tensor.shape)} for {str(path)!r}"
        )
    if first is not None and tensor.shape != first[1].shape:
        raise ValueError(
            f"the input transform must produce a fixed size (resize and crop), got "
            f"{tuple(first[1].shape)} for {str(first[0])!r} but {tuple(tensor.shape)} for "
            f"{str(path)!r}"
        )
