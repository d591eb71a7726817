"""Data sets behind one registry: `digits` (bundled), `imagefolder:PATH`, `cifar10:ROOT`.

Every data set yields `(image float[3, H, W] in [0, 1], label int)`; VQGAN tokenizers take [0, 1]
images, so nothing is normalised. Training transforms follow MAGE (RandomResizedCrop with
scale (0.2, 1.0) + horizontal flip); evaluation resizes and centre-crops.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mage_bench.config import DataConfig
from mage_bench.errors import DataError
from mage_bench.registry import Registry

SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")

# Data sets held in memory as tensors (`tensors()`): no per-item transform, so tokens can be cached.
IN_MEMORY = frozenset({"digits"})

DatasetFactory = Callable[[str | None, DataConfig, str, bool], Any]
DATASETS: Registry[DatasetFactory] = Registry("data set")


@dataclass(frozen=True)
class DatasetSpec:
    """`name[:argument]`, e.g. `imagefolder:/data/imagenet`; the argument is a path for folder sets."""

    name: str
    argument: str | None

    @classmethod
    def parse(cls, spec: str) -> DatasetSpec:
        name, sep, argument = spec.partition(":")
        return cls(name, argument if sep else None)


def dataset_identity(dataset: Any) -> str:
    """What makes two data sets of one config hold the same images, beyond the config as typed: the
    resolved path and a digest of the file listing (names, not contents). Every registered data set
    sets `identity`; one that does not is refused rather than keyed on its typed path."""
    identity = getattr(dataset, "identity", None)
    if not identity:
        raise DataError(f"data set {type(dataset).__name__} has no identity; set dataset.identity in its factory")
    return identity


# Data settings that do not change an image's pixels: left out of cache keys, so e.g. another worker
# count reuses the same features and reference (cache_tokens changes the training views only).
NOT_PIXELS = ("num_workers", "download", "cache_tokens")


def pixel_settings(config: DataConfig) -> dict[str, Any]:
    """The data settings that make an image's pixels, for cache keys: the typed name reduced to its kind
    (`imagefolder:data/x` -> `imagefolder`), since `dataset_identity` holds the resolved path."""
    from mage_bench.config import to_dict

    settings = {k: v for k, v in to_dict(config).items() if k not in NOT_PIXELS}
    settings["name"] = DatasetSpec.parse(config.name).name
    return settings


def is_in_memory(config: DataConfig) -> bool:
    return DatasetSpec.parse(config.name).name in IN_MEMORY


def create_dataset(config: DataConfig, split: str, train_transform: bool | None = None) -> Any:
    """A torch `Dataset` for `config.name` and `split`; `train_transform` defaults to split == 'train'."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    spec = DatasetSpec.parse(config.name)
    factory = DATASETS.get(spec.name)
    return factory(spec.argument, config, split, split == "train" if train_transform is None else train_transform)


def image_transform(image_size: int, train: bool, resize: str = "bilinear") -> Callable:
    """MAGE's pre-processing: no normalisation (the VQGAN takes [0, 1] images). `resize` is the filter
    of the crops and resizes (official: bilinear, `data.resize`)."""
    from torchvision import transforms as T

    interpolation = T.InterpolationMode(resize)
    if train:
        return T.Compose([
            T.RandomResizedCrop(image_size, scale=(0.2, 1.0), interpolation=interpolation),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
        ])
    return T.Compose([
        T.Resize(image_size, interpolation=interpolation),
        T.CenterCrop(image_size),
        T.ToTensor(),
    ])


# --------------------------------------------------------------------------------------------
# digits: scikit-learn's bundled 1,797 real 8x8 handwritten digits, the embedded default.


class TensorImageDataset:
    """An in-memory data set: `images` float[N, 3, H, W] in [0, 1], `labels` long[N]."""

    def __init__(self, images: Any, labels: Any, classes: list[str], description: str) -> None:
        self.images = images
        self.labels = labels
        self.classes = classes
        self.description = description

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.images[index], int(self.labels[index])

    def tensors(self) -> tuple[Any, Any]:
        return self.images, self.labels


@functools.lru_cache(maxsize=1)
def digits_arrays() -> tuple[Any, Any]:
    """scikit-learn's bundled digits as (images [1797, 8, 8] in 0..16, labels), read once per process: a
    read takes ~0.1 s and one sweep run asks a dozen times (training, proxies, every evaluator). Read-only,
    so that no caller changes another's copy."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    bunch.images.flags.writeable = False
    bunch.target.flags.writeable = False
    return bunch.images, bunch.target


def digits_split_indices(n_test_fraction: float, split_seed: int) -> tuple[Any, Any]:
    """The fixed stratified split of the 1,797 digits: (train indices, test indices), sorted."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    labels = digits_arrays()[1]
    if not 0.0 < n_test_fraction < 1.0:
        raise DataError(f"data.test_fraction={n_test_fraction} must be strictly between 0 and 1")
    train, test = train_test_split(
        np.arange(len(labels)), test_size=n_test_fraction, stratify=labels, random_state=split_seed
    )
    return np.sort(train), np.sort(test)


@DATASETS.register("digits")
def _digits(argument: str | None, config: DataConfig, split: str, train_transform: bool) -> TensorImageDataset:
    import numpy as np
    import torch
    import torch.nn.functional as F

    if argument:
        raise DataError(f"'digits' takes no argument, got 'digits:{argument}'; use --data digits")
    if config.image_size < 8:
        raise DataError(f"data.image_size={config.image_size} is below the digits' native 8 px")
    all_images, all_labels = digits_arrays()
    train_idx, test_idx = digits_split_indices(config.test_fraction, config.split_seed)
    idx = train_idx if split == "train" else test_idx
    pixels = torch.from_numpy(all_images[idx].astype(np.float32) / 16.0)  # [N, 8, 8], ink = 1
    images = F.interpolate(pixels[:, None], size=config.image_size, mode="bilinear", align_corners=False)
    images = images.clamp_(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()  # [N, 3, S, S]
    labels = torch.from_numpy(all_labels[idx].astype(np.int64))
    # Augmenting 8x8 digits with random crops or flips changes their class (6 vs 9), so the
    # training transform of this set is the identity; the data set is fixed and in memory.
    dataset = TensorImageDataset(images, labels, [str(d) for d in range(10)],
                                 f"digits {split} ({len(idx)} images, {config.image_size}px)")
    dataset.identity = f"digits:{split}"  # scikit-learn's bundled files; the split settings are in the config
    return dataset


# --------------------------------------------------------------------------------------------
# imagefolder:PATH, ImageNet layout: PATH/train/<class>/<image>, PATH/val/<class>/<image>.


class ImageFolderDataset:
    """Images read lazily; an unreadable file raises a `DataError` naming it."""

    def __init__(self, samples: list[tuple[Path, int]], classes: list[str], transform: Callable,
                 description: str) -> None:
        self.samples = samples
        self.classes = classes
        self.transform = transform
        self.description = description

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Any, int]:
        """(the decoded RGB image, its label), before the transform: decoded once for several views."""
        from PIL import Image, UnidentifiedImageError

        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")  # grayscale, palette and RGBA become RGB
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DataError(f"cannot read image {path}: {exc.__class__.__name__}; remove or replace the file") from None
        return image, label

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.load(index)
        return self.transform(image), label


def list_files(folder: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    """The files directly in `folder` with one of `suffixes` (lower case, with the dot), sorted.
    `os.scandir` knows each entry's type from the directory listing itself, so 1.28M ImageNet files (or
    a 50k-PNG reference) cost no stat call each (every rank lists them at start-up)."""
    with os.scandir(folder) as entries:
        return sorted(Path(e.path) for e in entries
                      if e.is_file() and os.path.splitext(e.name)[1].lower() in suffixes)


def _subfolders(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir())


def _listing_digest(lines: Any) -> str:
    digest = hashlib.sha256()
    for line in lines:
        digest.update(f"{line}\n".encode())
    return digest.hexdigest()[:16]


@DATASETS.register("imagefolder")
def _imagefolder(argument: str | None, config: DataConfig, split: str, train_transform: bool) -> ImageFolderDataset:
    if not argument:
        raise DataError("imagefolder needs a path: use --data imagefolder:/path/to/root (with train/ and val/)")
    root = Path(argument).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder")
    split_dir = root / ("train" if split == "train" else "val")
    if not split_dir.is_dir():
        raise DataError(f"{split_dir} is missing: imagefolder expects {root}/train/<class>/ and {root}/val/<class>/")
    classes = _subfolders(split_dir)
    if not classes:
        raise DataError(f"{split_dir} has no class folders; put images in {split_dir}/<class>/")
    # Both splits must agree on the class list, or labels would silently mean different classes.
    other_dir = root / ("val" if split == "train" else "train")
    if other_dir.is_dir():
        other = _subfolders(other_dir)
        missing = sorted(set(other) - set(classes))
        if missing:
            raise DataError(f"class folder {split_dir / missing[0]} is missing (present in {other_dir}); "
                            "both splits need the same classes")
    samples: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        images = list_files(split_dir / name)
        if not images:
            raise DataError(f"class folder {split_dir / name} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        samples.extend((path, label) for path in images)
    dataset = ImageFolderDataset(samples, classes, image_transform(config.image_size, train_transform, config.resize),
                                 f"imagefolder {split_dir} ({len(samples)} images, {len(classes)} classes)")
    # Another folder typed the same way (a subset, another machine's layout) lists other files.
    resolved = split_dir.resolve()
    dataset.identity = (f"imagefolder:{resolved}:{len(samples)}:"
                        + _listing_digest(f"{path.relative_to(split_dir)}\t{label}" for path, label in samples))
    return dataset


# --------------------------------------------------------------------------------------------
# cifar10:ROOT, torchvision's CIFAR-10 from local files (download only with data.download).


@DATASETS.register("cifar10")
def _cifar10(argument: str | None, config: DataConfig, split: str, train_transform: bool) -> Any:
    from torchvision.datasets import CIFAR10

    if not argument:
        raise DataError("cifar10 needs a root folder: use --data cifar10:/path/holding/cifar-10-batches-py")
    root = Path(argument).expanduser()
    try:
        dataset = CIFAR10(str(root), train=split == "train", download=config.download,
                          transform=image_transform(config.image_size, train_transform, config.resize))
    except RuntimeError as exc:
        raise DataError(f"CIFAR-10 not found or corrupted under {root / 'cifar-10-batches-py'} ({exc}); "
                        "place the extracted batches there or set data.download: true") from None
    dataset.description = f"cifar10 {split} ({len(dataset)} images, {config.image_size}px)"
    batches = root / "cifar-10-batches-py"
    dataset.identity = f"cifar10:{batches.resolve()}:{split}:" + _listing_digest(
        f"{p.name}\t{p.stat().st_size}" for p in sorted(batches.iterdir()) if p.is_file())
    return dataset
