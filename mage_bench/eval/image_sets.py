"""Folders of images as the generation metrics see them, and data-set splits written as PNG folders.

- A folder is checked first: no images, unreadable files or mixed sizes are one-line errors. Grayscale,
  palette and RGBA images are converted to RGB (alpha dropped) by both metric libraries on load. In a
  folder written by `mage-bench generate` (it holds generation.json) the preview grid.png is not a sample.
- A data set used as the real side has its split written once as lossless PNGs into the cache, like the
  paper's PNG reference set (the images are the data pipeline's eval view: resize + centre crop). The
  folder is keyed on the data settings that change pixels, the split and the data set's identity (its
  resolved path and a digest of its file listing: `data.dataset_identity`), never on the path as typed,
  so `imagefolder:data/imagenet` typed in two places cannot share statistics. The images are decoded by
  DataLoader workers (`data.num_workers`) and encoded by a thread pool (`samples.write_pngs`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mage_bench.errors import UserError
from mage_bench.io import slug

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")  # torch-fidelity's samples_find_ext default
DEFAULT_CACHE = Path(os.environ.get("MAGE_BENCH_CACHE", Path.home() / ".cache" / "mage-bench"))


@dataclass(frozen=True)
class ImageSet:
    folder: Path
    files: tuple[Path, ...]
    count: int
    size: tuple[int, int]  # (width, height)
    identity: str  # what makes its statistics the same: data set + split + size, or folder contents
    description: str


def list_images(folder: Path) -> list[Path]:
    """The images torch-fidelity and clean-fid would read: png/jpg/jpeg directly in `folder`, sorted."""
    from mage_bench.data import list_files

    return list_files(folder, tuple(f".{extension}" for extension in IMAGE_EXTENSIONS))


def scan_folder(folder: str | Path, description: str | None = None) -> ImageSet:
    """Check a folder of images: exists, not empty, every image readable and of one size."""
    from PIL import Image, UnidentifiedImageError

    from mage_bench.samples import GRID, MANIFEST

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of images")
    files = list_images(folder)
    if (folder / MANIFEST).is_file():  # `mage-bench generate` output: its preview grid is no sample
        files = [f for f in files if f.name != GRID]
    if not files:
        raise UserError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}); generate or copy images there")
    sizes: dict[tuple[int, int], Path] = {}
    fingerprint = hashlib.sha256()
    for path in files:
        try:
            with Image.open(path) as image:
                sizes.setdefault(image.size, path)
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"{path} is not a readable image ({exc}); remove or replace it") from None
        stat = path.stat()
        fingerprint.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    if len(sizes) > 1:
        (a, pa), (b, pb) = list(sizes.items())[:2]
        raise UserError(f"{folder} mixes image sizes ({a[0]}x{a[1]} in {pa.name}, {b[0]}x{b[1]} in {pb.name}); "
                        "resize them to one size first")
    identity = f"folder:{folder.resolve()}:{len(files)}:{fingerprint.hexdigest()[:16]}"
    return ImageSet(folder, tuple(files), len(files), next(iter(sizes)), identity, description or str(folder))


def reference_spec(data: Any, split: str, dataset: Any) -> str:
    """What a reference folder (and every statistic of it) is keyed on, as canonical JSON: the data settings
    that change pixels, the split, the view, and the data set's identity in place of the path as typed."""
    from mage_bench.data import dataset_identity, pixel_settings

    return json.dumps({"data": pixel_settings(data), "split": split, "view": "eval_resize_center_crop",
                       "identity": dataset_identity(dataset)}, sort_keys=True)


def _label(name: str) -> str:
    """A readable folder-name prefix that does not depend on how the path was typed: the data set kind and
    the resolved folder's own name (`imagefolder:data/imagenet` -> `imagefolder-imagenet`)."""
    from mage_bench.data import DatasetSpec

    spec = DatasetSpec.parse(name)
    if not spec.argument:
        return slug(spec.name, empty="data")
    return slug(f"{spec.name}-{Path(spec.argument).expanduser().resolve().name}", empty="data")


def dataset_reference(data: Any, split: str, cache_dir: Path, progress: bool = False) -> ImageSet:
    """A data set split as PNG files under the cache (written once, atomically as a folder)."""
    from PIL import Image

    from mage_bench.data import create_dataset
    from mage_bench.io import atomic_folder

    # Built even when the folder exists: its identity (the listing) is what tells two trees apart.
    dataset = create_dataset(data, split, train_transform=False)
    spec = reference_spec(data, split, dataset)
    key = hashlib.sha256(spec.encode()).hexdigest()[:16]
    folder = cache_dir / "reference-images" / f"{_label(data.name)}-{split}-{data.image_size}px-{key}"
    if not folder.is_dir():
        with atomic_folder(folder) as staging:  # another run publishing it first is fine: theirs is kept
            _write_pngs(dataset, staging, progress, f"reference {data.name} {split}", _workers(data))
    files = list_images(folder)
    with Image.open(files[0]) as image:
        size = image.size
    return ImageSet(folder, tuple(files), len(files), size, f"dataset:{spec}",
                    f"{data.name} {split} ({len(files)} images)")


def _workers(data: Any) -> int:
    """DataLoader workers to decode the reference: the data config's, none for in-memory sets."""
    from mage_bench.data import is_in_memory

    return 0 if is_in_memory(data) else data.num_workers


def _write_pngs(dataset: Any, folder: Path, progress: bool, desc: str, num_workers: int = 0) -> None:
    """`dataset`'s images as NNNNNN.png in `folder` (a staging folder: written straight to final names).
    Workers decode and resize (0: in this process), a thread pool encodes; pixels are rounded to uint8."""
    import torch
    from tqdm import tqdm

    from mage_bench.samples import png_pool, write_pngs

    loader = torch.utils.data.DataLoader(dataset, batch_size=256, shuffle=False, num_workers=num_workers)
    index = 0
    with png_pool() as pool:
        for images, _ in tqdm(loader, desc=desc, unit="batch", file=sys.stderr, disable=not progress):
            pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            write_pngs([(folder / f"{index + i:06d}.png", array) for i, array in enumerate(pixels)], pool,
                       atomic=False)  # the folder is published as a whole: no per-file rename needed
            index += len(pixels)


def resolve_fake(fake: str, num: int | None) -> ImageSet:
    """`--fake` as a folder of images (runs are handled by the caller, which generates into RUN/samples)."""
    images = scan_folder(fake)
    if num is not None and num != images.count:
        raise UserError(f"--num {num} but {fake} holds {images.count} images; --num applies to runs only")
    return images
