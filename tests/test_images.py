"""Images in the wild: every PIL mode reaches the model right, bad files cost only themselves."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from flexens.images import (
    IMAGE_SUFFIXES,
    UnlabelledBatches,
    find_images,
    image_batches,
    load_images,
    to_model_mode,
)

SIZE = 32


def _transform() -> v2.Compose:
    return v2.Compose(
        [v2.ToImage(), v2.Resize(SIZE), v2.CenterCrop(SIZE), v2.ToDtype(torch.float32, scale=True)]
    )


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def _transparent_rgba() -> Image.Image:
    """Left half opaque red, right half fully transparent *black* (white once composited)."""
    image = Image.new("RGBA", (40, 20), (0, 0, 0, 0))
    image.paste((255, 0, 0, 255), (0, 0, 20, 20))
    return image


def _one(path: Path, in_chans: int = 3) -> torch.Tensor:
    loaded = load_images([path], in_chans, _transform())
    assert loaded.failures == []
    assert loaded.paths == [path]
    return loaded.tensors[0]


# -- find_images ------------------------------------------------------------------------


def test_find_images_folder_is_recursive_sorted_and_case_insensitive(tmp_path: Path) -> None:
    img = Image.new("RGB", (4, 4))
    b = _save(img, tmp_path / "b.PNG")
    a = _save(img, tmp_path / "sub" / "deeper" / "a.JpEg")
    c = _save(img, tmp_path / "c.webp")
    (tmp_path / "notes.txt").write_text("not an image")
    _save(img, tmp_path / "._b.png")  # macOS resource fork: hidden, skipped
    _save(img, tmp_path / ".thumbs" / "x.png")  # hidden folder, skipped
    assert find_images(tmp_path) == sorted([a, b, c])
    assert find_images(str(tmp_path)) == sorted([a, b, c])


def test_find_images_takes_an_explicit_file_whatever_its_suffix(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (4, 4)), tmp_path / "photo.data", format="PNG")
    assert find_images(path) == [path]


def test_image_suffixes_are_lower_case_with_dot() -> None:
    assert {".jpg", ".jpeg", ".png", ".tiff", ".webp", ".pgm"} <= IMAGE_SUFFIXES
    assert all(s.startswith(".") and s == s.lower() for s in IMAGE_SUFFIXES)


def test_find_images_missing_path_names_it_and_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError) as info:
        find_images(missing)
    message = str(info.value)
    assert str(missing) in message and "input=" in message and "\n" not in message
    with pytest.raises(FileNotFoundError) as info:  # the setting that named it
        find_images(missing, "calibrate.unlabelled")
    assert str(info.value).startswith(f"calibrate.unlabelled {str(missing)!r} does not exist")
    assert str(info.value).endswith("pass calibrate.unlabelled=<image file or folder>")


def test_find_images_empty_folder_names_it(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="no images") as info:
        find_images(folder)
    assert str(folder) in str(info.value)


# -- to_model_mode ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode", ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I;16B", "I", "F"]
)
@pytest.mark.parametrize("in_chans, target", [(3, "RGB"), (1, "L")])
def test_to_model_mode_handles_every_mode(mode: str, in_chans: int, target: str) -> None:
    out = to_model_mode(Image.new(mode, (5, 3)), in_chans)
    assert out.mode == target and out.size == (5, 3)


def test_to_model_mode_rejects_other_channel_counts() -> None:
    with pytest.raises(ValueError, match="in_chans"):
        to_model_mode(Image.new("RGB", (2, 2)), 4)


def test_rgba_transparent_pixels_become_white() -> None:
    out = np.asarray(to_model_mode(_transparent_rgba(), 3))
    assert tuple(out[10, 5]) == (255, 0, 0)
    assert tuple(out[10, 35]) == (255, 255, 255)
    gray = np.asarray(to_model_mode(_transparent_rgba(), 1))
    assert gray[10, 35] == 255


def test_half_transparent_pixel_blends_with_white() -> None:
    out = np.asarray(to_model_mode(Image.new("RGBA", (1, 1), (0, 0, 0, 128)), 3))
    assert abs(int(out[0, 0, 0]) - 127) <= 1


def test_16bit_and_32bit_integer_grayscale_is_scaled_not_clipped() -> None:
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    for image in (Image.fromarray(values), Image.fromarray(values.astype(np.int32))):
        out = np.asarray(to_model_mode(image, 1))
        assert out[0].tolist() == [0, 128, 255], image.mode
    wide = Image.fromarray(np.array([[-1000, 0, 1000]], dtype=np.int32))
    assert np.asarray(to_model_mode(wide, 1))[0].tolist() == [0, 128, 255]


@pytest.mark.parametrize(
    "values, expected",
    [
        ([0.0, 0.5, 1.0], [0, 128, 255]),
        ([0.0, 100.0, 255.0], [0, 100, 255]),
        ([-1.0, 0.0, np.nan], [0, 255, 255]),
    ],
)
def test_float_grayscale_is_scaled_by_its_range(values: list[float], expected: list[int]) -> None:
    image = Image.fromarray(np.array([values], dtype=np.float32))
    assert np.asarray(to_model_mode(image, 1))[0].tolist() == expected


# -- load_images --------------------------------------------------------------------------


def test_load_images_decodes_every_mode_from_disk(tmp_path: Path) -> None:
    rgb = Image.new("RGB", (50, 40), (10, 200, 30))
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (20, 0, 40, 40))
    files = {
        "gray.png": _save(Image.new("L", (30, 60), 77), tmp_path / "gray.png"),
        "la.png": _save(Image.new("LA", (33, 33), (77, 255)), tmp_path / "la.png"),
        "palette.png": _save(palette, tmp_path / "palette.png", transparency=1),
        "palette.gif": _save(palette, tmp_path / "palette.gif", transparency=1),
        "rgba.png": _save(_transparent_rgba(), tmp_path / "rgba.png"),
        "cmyk.jpg": _save(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), tmp_path / "cmyk.jpg"),
        "cmyk.tif": _save(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), tmp_path / "cmyk.tif"),
        "rgb.jpg": _save(rgb, tmp_path / "rgb.jpg"),
        "rgb.bmp": _save(rgb, tmp_path / "rgb.bmp"),
        "rgb.webp": _save(rgb, tmp_path / "rgb.webp"),
        "gray.pgm": _save(Image.new("L", (30, 60), 77), tmp_path / "gray.pgm"),
        "deep.png": _save(Image.new("I;16", (40, 40), 32768), tmp_path / "deep.png"),
        "deep.tif": _save(Image.new("I;16", (40, 40), 32768), tmp_path / "deep.tif"),
    }
    for name, mode in [("deep.png", "I;16"), ("cmyk.jpg", "CMYK"), ("palette.png", "P")]:
        with Image.open(files[name]) as image:
            assert image.mode == mode, name
    paths = find_images(tmp_path)
    loaded = load_images(paths, 3, _transform())
    assert loaded.failures == []
    assert loaded.paths == paths
    assert loaded.tensors.shape == (len(files), 3, SIZE, SIZE)
    assert loaded.tensors.dtype == torch.float32
    by_name = {p.name: t for p, t in zip(loaded.paths, loaded.tensors, strict=True)}
    # 16-bit mid-grey 32768 is ~128/255, not clipped to white
    assert torch.allclose(by_name["deep.png"], torch.full((3, SIZE, SIZE), 128 / 255), atol=1e-6)
    assert torch.allclose(by_name["deep.tif"], by_name["deep.png"])
    # a fully transparent pixel shows white; the palette's transparent index too
    assert torch.allclose(by_name["rgba.png"][:, 16, -1], torch.ones(3))
    assert torch.allclose(by_name["palette.png"][:, 16, -1], torch.ones(3))
    assert torch.allclose(by_name["palette.png"][:, 16, 0], torch.tensor([1.0, 0.0, 0.0]))
    # CMYK (0, 255, 255, 0) is red
    for name in ("cmyk.jpg", "cmyk.tif"):
        red, green, blue = by_name[name][:, 16, 16].tolist()
        assert red > 0.9 and green < 0.1 and blue < 0.1, name
    # grayscale is replicated into the three channels
    assert torch.allclose(by_name["gray.png"], torch.full((3, SIZE, SIZE), 77 / 255), atol=1e-6)


def test_load_images_for_a_one_channel_model(tmp_path: Path) -> None:
    paths = [
        _save(Image.new("RGB", (40, 40), (255, 255, 255)), tmp_path / "white.png"),
        _save(_transparent_rgba(), tmp_path / "rgba.png"),
        _save(Image.new("I;16", (40, 40), 65535), tmp_path / "deep.png"),
    ]
    loaded = load_images(paths, 1, _transform())
    assert loaded.failures == []
    assert loaded.tensors.shape == (3, 1, SIZE, SIZE)
    assert torch.allclose(loaded.tensors[0], torch.ones(1, SIZE, SIZE))
    assert torch.allclose(loaded.tensors[2], torch.ones(1, SIZE, SIZE))
    assert loaded.tensors[1][0, 16, -1] == 1.0  # transparent → white


def test_load_images_applies_exif_orientation(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    path = _save(image, tmp_path / "phone.jpg", exif=exif)
    loaded = load_images([path], 3, v2.Compose([v2.ToImage()]))
    assert loaded.tensors.shape == (1, 3, 40, 20)


def test_corrupt_and_truncated_files_are_reported_and_the_rest_load(tmp_path: Path) -> None:
    good = _save(Image.new("RGB", (64, 48), (1, 2, 3)), tmp_path / "good.png")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(np.random.default_rng(0).bytes(2048))
    noise = np.random.default_rng(1).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    whole = _save(Image.fromarray(noise), tmp_path / "whole.jpg", quality=95)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(whole.read_bytes()[: os.path.getsize(whole) // 2])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "text.png"
    text.write_text("hello, not a png")
    paths = find_images(tmp_path)
    loaded = load_images(paths, 3, _transform())
    assert loaded.paths == [good, whole]
    assert loaded.tensors.shape == (2, 3, SIZE, SIZE)
    failed = dict(loaded.failures)
    assert set(failed) == {corrupt, truncated, empty, text}
    assert "truncated" in failed[truncated]
    for reason in failed.values():
        assert reason and "\n" not in reason


def test_no_loadable_image_gives_an_empty_result(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really")
    loaded = load_images([bad], 3, _transform())
    assert loaded.tensors.numel() == 0 and loaded.paths == []
    assert [p for p, _ in loaded.failures] == [bad]


def test_a_failing_transform_costs_only_its_file(tmp_path: Path) -> None:
    small = _save(Image.new("RGB", (8, 8)), tmp_path / "small.png")
    big = _save(Image.new("RGB", (64, 64)), tmp_path / "big.png")

    def picky(image: Image.Image) -> torch.Tensor:
        if image.width < 16:
            raise RuntimeError("too small\nto classify")
        return _transform()(image)

    loaded = load_images([small, big], 3, picky)
    assert loaded.paths == [big]
    assert loaded.failures == [(small, "transform failed: RuntimeError: too small to classify")]


def test_transform_without_fixed_size_is_an_error_naming_files(tmp_path: Path) -> None:
    a = _save(Image.new("RGB", (40, 30)), tmp_path / "a.png")
    b = _save(Image.new("RGB", (30, 40)), tmp_path / "b.png")
    with pytest.raises(ValueError, match="fixed size") as info:
        load_images([a, b], 3, v2.Compose([v2.ToImage(), v2.Resize(SIZE)]))
    assert str(a) in str(info.value) and str(b) in str(info.value)


def test_transform_must_return_model_channels_tensor(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (8, 8)), tmp_path / "a.png")
    with pytest.raises(TypeError, match="ToImage"):
        load_images([path], 3, v2.Compose([v2.Resize(SIZE)]))
    with pytest.raises(ValueError, match="3×H×W"):
        load_images([path], 3, v2.Compose([v2.ToImage(), v2.Grayscale()]))


# -- image_batches -------------------------------------------------------------------------
def test_image_batches_decode_a_folder_a_batch_at_a_time(tmp_path: Path, capsys) -> None:
    """Batches of the sorted files; a bad file shrinks its batch and is reported; a batch
    of bad files only is not yielded."""
    for i in range(5):
        _save(Image.new("RGB", (40, 30), (i, 0, 0)), tmp_path / f"{i}.png")
    for name in ("5.png", "6.png"):
        (tmp_path / name).write_text("not an image")
    batches = list(image_batches(tmp_path, 3, _transform(), batch_size=2))
    assert [[p.name for p in b.paths] for b in batches] == [
        ["0.png", "1.png"],
        ["2.png", "3.png"],
        ["4.png"],
    ]
    assert [tuple(b.tensors.shape) for b in batches] == [(2, 3, SIZE, SIZE)] * 2 + [
        (1, 3, SIZE, SIZE)
    ]
    [whole] = image_batches(tmp_path, 3, _transform(), batch_size=100)
    assert torch.equal(torch.cat([b.tensors for b in batches]), whole.tensors)
    printed = capsys.readouterr().out
    assert "skipped" in printed and "5.png" in printed and "6.png" in printed
    # calibrate.unlabelled's dataset: the same batches, unlabelled, each time it is read
    dataset = UnlabelledBatches(tmp_path, find_images(tmp_path), 3, _transform(), batch_size=2)
    for _ in range(2):
        read = list(dataset)
        assert [len(x) for x, _ in read] == [2, 2, 1]
        assert torch.equal(torch.cat([x for x, _ in read]), whole.tensors)
        assert all(torch.equal(y, torch.zeros(len(x), dtype=torch.long)) for x, y in read)


def test_image_batches_hold_one_size_across_batches(tmp_path: Path) -> None:
    a = _save(Image.new("RGB", (40, 30)), tmp_path / "a.png")
    b = _save(Image.new("RGB", (30, 40)), tmp_path / "b.png")
    transform = v2.Compose([v2.ToImage(), v2.Resize(SIZE)])
    with pytest.raises(ValueError, match="fixed size") as info:
        list(image_batches(tmp_path, 3, transform, batch_size=1))
    assert str(a) in str(info.value) and str(b) in str(info.value)


def test_image_batches_with_nothing_readable_is_one_error_naming_the_folder(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ValueError, match="none of the 1 image") as info:
        list(image_batches(tmp_path, 3, _transform(), batch_size=4))
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)
