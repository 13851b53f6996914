import numpy as np
import pytest
import pytorch_lightning as L
import torch
from PIL import Image

from flexens.data import DigitsDataModule, ImageFolderDataModule, calibration_split


def test_calibration_split_is_deterministic_stratified_and_disjoint():
    targets = np.repeat(np.arange(4), 50)
    train, calib = calibration_split(targets, 0.2, split_seed=0)
    again_train, again_calib = calibration_split(targets, 0.2, split_seed=0)
    assert np.array_equal(calib, again_calib) and np.array_equal(train, again_train)
    assert not set(train) & set(calib) and len(train) + len(calib) == len(targets)
    assert np.bincount(targets[calib]).tolist() == [10, 10, 10, 10]
    _, other = calibration_split(targets, 0.2, split_seed=1)
    assert not np.array_equal(calib, other)
    with pytest.raises(ValueError, match="calib_fraction must be in"):
        calibration_split(targets, 1.5, 0)


def test_digits_split_does_not_move_with_the_member_seed():
    fingerprints, calib_sets = set(), []
    for seed in (0, 1, 7):
        L.seed_everything(seed)
        dm = DigitsDataModule()
        dm.setup()
        fingerprints.add(dm.calib_fingerprint())
        calib_sets.append(dm.calib_indices)
        trained = set(dm.train_dataloader().dataset.indices)
        assert not trained & set(dm.calib_indices.tolist())
    assert len(fingerprints) == 1
    assert all(np.array_equal(calib_sets[0], c) for c in calib_sets)
    assert dm.describe()["test_size"] == 450 and dm.num_classes == 10


def make_tree(root, classes=("cat", "dog", "eel"), per_class=10, size=12):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


@pytest.mark.parametrize("cache_decoded", [False, True])
def test_imagefolder_module_on_a_small_tree(tmp_path, cache_decoded):
    root = make_tree(tmp_path / "tree")
    dm = ImageFolderDataModule(
        root=str(root),
        name="tiny",
        test_split="test",
        preset="cifar",
        image_size=8,
        cache_decoded=cache_decoded,
        cache_dir=str(tmp_path / "cache"),
        calib_fraction=0.2,
        batch_size=4,
    )
    dm.setup()
    assert dm.class_names == ["cat", "dog", "eel"]
    assert len(dm.calib_indices) == 6 and len(dm.train_indices) == 24
    x, y = next(iter(dm.calib_dataloader()))
    assert x.shape == (6, 3, 8, 8) and x.dtype == torch.float32
    assert next(iter(dm.train_dataloader()))[0].shape == (4, 3, 8, 8)
    if cache_decoded:
        assert len(list((tmp_path / "cache" / "decoded").glob("*.pt"))) == 2


def test_imagefolder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataModule(root=str(tmp_path / "nowhere"), test_split="test").setup()
    root = make_tree(tmp_path / "tree")
    for f in (root / "train" / "dog").iterdir():
        f.unlink()
    with pytest.raises(FileNotFoundError, match="dog' is empty"):
        ImageFolderDataModule(root=str(root), test_split="test").setup()


@pytest.mark.parametrize("preset", ["imagenet", "cifar"])
def test_decoded_cache_and_files_give_the_same_images(tmp_path, preset):
    """The same recipe trains the same way with or without data.cache_decoded: both paths run
    one transform pipeline (the cache only stores its deterministic decode head)."""
    root = make_tree(tmp_path / "tree", per_class=4, size=20)
    sets = []
    for cache_decoded in (False, True):
        dm = ImageFolderDataModule(
            root=str(root),
            test_split="test",
            preset=preset,
            image_size=16,
            cache_decoded=cache_decoded,
            cache_dir=str(tmp_path / "cache"),
            calib_fraction=0.5,
        )
        dm.setup()
        sets.append((dm.train_augmented, dm.train_plain, dm.test_set))
    for from_files, from_cache in zip(*sets, strict=True):
        for i in range(len(from_files)):
            torch.manual_seed(i)
            image, label = from_files[i]
            torch.manual_seed(i)
            cached, cached_label = from_cache[i]
            assert label == cached_label and torch.equal(image, cached)


def test_decoded_cache_refuses_images_of_several_sizes(tmp_path):
    root = make_tree(tmp_path / "tree", per_class=2, size=20)
    Image.fromarray(np.zeros((30, 20, 3), dtype=np.uint8)).save(root / "train" / "cat" / "9.png")
    dm = ImageFolderDataModule(
        root=str(root), test_split="test", preset="imagenet", image_size=16, cache_decoded=True,
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    with pytest.raises(ValueError, match="needs images of one size.*cache_decoded=false"):
        dm.setup()
