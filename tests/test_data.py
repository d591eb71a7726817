import numpy as np
import pytest
import torch
from PIL import Image

from mage_bench.config import DataConfig
from mage_bench.data import create_dataset, digits_split_indices
from mage_bench.errors import ConfigError, DataError, UserError


def test_digits_shapes_range_and_split():
    cfg = DataConfig(name="digits", image_size=16)
    train, test = create_dataset(cfg, "train"), create_dataset(cfg, "test")
    assert len(train) + len(test) == 1797
    images, labels = train.tensors()
    assert images.shape == (len(train), 3, 16, 16) and images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0 and float(images.max()) > 0.9
    assert torch.equal(images[:, 0], images[:, 2])  # grey digits replicated to 3 channels
    assert labels.dtype == torch.long and set(labels.tolist()) == set(range(10))
    # Stratified: every class keeps its share in test within one image.
    full = np.bincount(np.concatenate([labels.numpy(), test.tensors()[1].numpy()]), minlength=10)
    assert np.all(np.abs(np.bincount(test.tensors()[1].numpy(), minlength=10) - 0.2 * full) <= 1)


def test_digits_split_is_fixed_by_seed_and_disjoint():
    a_train, a_test = digits_split_indices(0.2, 0)
    b_train, b_test = digits_split_indices(0.2, 0)
    c_train, _ = digits_split_indices(0.2, 1)
    assert np.array_equal(a_test, b_test) and not np.array_equal(a_train, c_train)
    assert not set(a_train) & set(a_test)


def test_digits_other_size():
    images, _ = create_dataset(DataConfig(image_size=32), "test").tensors()
    assert images.shape[-2:] == (32, 32)


@pytest.mark.parametrize("cfg, message", [
    (DataConfig(name="digits:foo"), "'digits' takes no argument"),
    (DataConfig(image_size=4), "below the digits' native 8 px"),
    (DataConfig(test_fraction=1.5), "test_fraction=1.5 must be strictly between 0 and 1"),
    (DataConfig(name="digts"), r"did you mean 'digits'"),
])
def test_digits_bad_input(cfg, message):
    with pytest.raises(UserError, match=message):
        create_dataset(cfg, "train")


def test_unknown_split():
    with pytest.raises(DataError, match="unknown split 'val'"):
        create_dataset(DataConfig(), "val")


def _folder(root, split, classes, n=2, mode="RGB", size=(20, 12)):
    rng = np.random.default_rng(0)
    for c in classes:
        d = root / split / c
        d.mkdir(parents=True)
        for i in range(n):
            channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
            arr = rng.integers(0, 255, size=(size[1], size[0], channels), dtype=np.uint8)
            Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode).save(d / f"{i}.png")


def test_imagefolder_reads_and_transforms(tmp_path):
    _folder(tmp_path, "train", ["cat", "dog"])
    _folder(tmp_path, "val", ["cat", "dog"], n=1, mode="L")  # greyscale becomes RGB
    cfg = DataConfig(name=f"imagefolder:{tmp_path}", image_size=8)
    train, test = create_dataset(cfg, "train"), create_dataset(cfg, "test")
    assert train.classes == ["cat", "dog"] and len(train) == 4 and len(test) == 2
    x, y = test[1]
    assert x.shape == (3, 8, 8) and 0.0 <= float(x.min()) <= float(x.max()) <= 1.0 and y == 1
    x, _ = train[0]  # RandomResizedCrop + flip
    assert x.shape == (3, 8, 8)


def test_imagefolder_rgba_becomes_rgb(tmp_path):
    _folder(tmp_path, "train", ["a"], mode="RGBA")
    _folder(tmp_path, "val", ["a"], mode="RGBA")
    x, _ = create_dataset(DataConfig(name=f"imagefolder:{tmp_path}", image_size=8), "test")[0]
    assert x.shape == (3, 8, 8)


def test_imagefolder_errors(tmp_path):
    cfg = DataConfig(name=f"imagefolder:{tmp_path}", image_size=8)
    with pytest.raises(DataError, match="imagefolder needs a path"):
        create_dataset(DataConfig(name="imagefolder"), "train")
    with pytest.raises(DataError, match="does not exist"):
        create_dataset(DataConfig(name=f"imagefolder:{tmp_path / 'nope'}"), "train")
    with pytest.raises(DataError, match=r"train is missing"):
        create_dataset(cfg, "train")
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="has no class folders"):
        create_dataset(cfg, "train")
    (tmp_path / "train" / "cat").mkdir()
    with pytest.raises(DataError, match=r"class folder .*train/cat holds no images"):
        create_dataset(cfg, "train")


def test_imagefolder_missing_class_names_the_folder(tmp_path):
    _folder(tmp_path, "train", ["cat", "dog"])
    _folder(tmp_path, "val", ["cat"])
    with pytest.raises(DataError, match=r"class folder .*val/dog is missing"):
        create_dataset(DataConfig(name=f"imagefolder:{tmp_path}"), "test")


def test_imagefolder_unreadable_image_names_the_file(tmp_path):
    _folder(tmp_path, "train", ["cat"])
    _folder(tmp_path, "val", ["cat"])
    bad = tmp_path / "val" / "cat" / "2.png"
    bad.write_bytes(b"not a png at all")
    ds = create_dataset(DataConfig(name=f"imagefolder:{tmp_path}", image_size=8), "test")
    with pytest.raises(DataError, match=r"cannot read image .*val/cat/2.png"):
        ds[2]


def test_cifar10_missing_files_without_download(tmp_path):
    with pytest.raises(DataError, match=r"CIFAR-10 not found or corrupted under .*set data.download: true"):
        create_dataset(DataConfig(name=f"cifar10:{tmp_path}", image_size=32), "train")
    with pytest.raises(DataError, match="cifar10 needs a root folder"):
        create_dataset(DataConfig(name="cifar10"), "train")


def test_folder_resizes_are_bilinear_by_default_and_recorded():
    from torchvision import transforms as T

    from mage_bench.config import from_dict
    from mage_bench.data import image_transform

    assert DataConfig().resize == "bilinear"  # the official pre-training crops and FID reference resize
    for train in (True, False):
        first = image_transform(32, train).transforms[0]
        assert first.interpolation == T.InterpolationMode.BILINEAR
        assert image_transform(32, train, "bicubic").transforms[0].interpolation == T.InterpolationMode.BICUBIC
    with pytest.raises(ConfigError, match="resize must be one of bilinear, bicubic"):
        from_dict(DataConfig, {"resize": "nearest"}, "data")
