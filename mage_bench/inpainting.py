"""`mage-bench inpaint`: complete partly masked images with a trained run, and write PNG triplets.

One batch (`complete_batch`): the mask (`mage.inpaint_masks`) gives unknown tokens and pixels per image;
pixel-space masks zero the unknown pixels before the tokenizer sees the image (nothing hidden leaks
into the known tokens); the known tokens are fixed and the unknown ones decoded iteratively
(`mage.generate.complete_tokens`), seeded per image index as `generate` is, so an image does not depend
on its batch; the VQGAN decodes the grid, and with `paste_back` the known pixels of the input replace
the decoded ones. The evaluator (`eval/inpaint.py`) and this command share it.

Output of `inpaint_images`: OUT/NNNNNN-original.png, -masked.png (unknown pixels grey), -result.png,
grid.png (one row of original | masked | result per image, the first 16) and inpaint.json (the settings).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mage_bench.errors import UserError

MANIFEST = "inpaint.json"
GRID = "grid.png"
GRID_IMAGES = 16  # images (rows) in an output folder's grid; the evaluator's panels show fewer
SHOWN_GREY = 0.5  # how unknown pixels are shown in the `masked` image (the model saw zeros or no tokens)
DECODE_BATCH = 64


@dataclass(frozen=True)
class Decoding:
    """How the unknown tokens are decoded; every field goes into records and manifests."""

    steps: int
    temperature: float
    argmax: bool = False
    paste_back: bool = False
    dilate: int = 0
    seed: int = 0

    def fields(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def decoding_of(run: Any, steps: int | None = None, temperature: float | None = None, argmax: bool = False,
                paste_back: bool = False, dilate: int = 0, seed: int = 0) -> Decoding:
    """The decoding settings, the run's own `generate` steps and temperature where not given."""
    steps = run.config.generate.steps if steps is None else steps
    temperature = run.config.generate.temperature if temperature is None else temperature
    if steps < 1 or temperature < 0 or dilate < 0:
        raise UserError(f"--steps must be >= 1, --temperature >= 0 and --dilate >= 0 "
                        f"(got {steps}, {temperature}, {dilate})")
    return Decoding(steps, temperature, argmax, paste_back, dilate, seed)


@dataclass
class Completion:
    """One batch's inputs and outputs (on the CPU); pixels float[B, 3, H, W] in [0, 1]."""

    indices: list[int]
    original: torch.Tensor
    shown: torch.Tensor  # the input as shown: unknown pixels grey
    result: torch.Tensor
    reconstruction: torch.Tensor  # the tokenizer's own decoding of the intact image's tokens (the ceiling)
    unknown_tokens: torch.Tensor  # bool[B, L]
    unknown_pixels: torch.Tensor  # bool[B, H, W]
    original_tokens: torch.Tensor  # long[B, L], of the intact image
    result_tokens: torch.Tensor  # long[B, L]


@torch.no_grad()
def complete_batch(run: Any, images: torch.Tensor, indices: list[int], mask: Any, decoding: Decoding,
                   device: str = "cpu") -> Completion:
    """Complete `images` (float[B, 3, H, W] in [0, 1], data-set positions `indices`) under `mask`."""
    from mage_bench.mage.generate import complete_tokens, decoding_noise
    from mage_bench.mage.inpaint_masks import PIXEL, masks_for

    B, _, H, W = images.shape
    grid = run.tokenizer.token_grid
    unknown_tokens, unknown_pixels = (torch.from_numpy(m) for m in
                                      masks_for(mask, indices, decoding.seed, grid, H, W, decoding.dilate))
    unknown_tokens, unknown_pixels = unknown_tokens.reshape(B, grid * grid), unknown_pixels.reshape(B, 1, H, W)
    original = images.to(device)
    original_tokens = run.tokenizer.encode(original).reshape(B, -1)
    if mask.space == PIXEL:  # zero the hidden pixels first (LTH14/mage#3): known tokens cannot see them
        known_tokens = run.tokenizer.encode(original * ~unknown_pixels.to(device)).reshape(B, -1)
    else:
        known_tokens = original_tokens
    noise = decoding_noise(decoding.seed, indices, decoding.steps, grid * grid)
    result_tokens = complete_tokens(run.model, known_tokens, unknown_tokens.to(device), noise, decoding.steps,
                                    decoding.temperature, argmax=decoding.argmax)
    result = run.tokenizer.decode(result_tokens.reshape(B, grid, grid))
    if decoding.paste_back:
        result = torch.where(unknown_pixels.to(device), result, original)
    reconstruction = run.tokenizer.decode(original_tokens.reshape(B, grid, grid))
    original, result, reconstruction = original.cpu(), result.cpu(), reconstruction.cpu()
    return Completion(list(indices), original, torch.where(unknown_pixels, SHOWN_GREY, original), result,
                      reconstruction, unknown_tokens, unknown_pixels.reshape(B, H, W), original_tokens.cpu(),
                      result_tokens.cpu())


def check_mask(run: Any, mask: Any, decoding: Decoding, evaluating: bool = False) -> None:
    """Fail before any work when `mask` cannot apply to the run's images (a mask file of another size, a
    border wider than half the image) or, when `evaluating`, leaves nothing unknown to score."""
    from mage_bench.mage.inpaint_masks import masks_for

    size = run.config.data.image_size
    tokens, _ = masks_for(mask, [0], decoding.seed, run.tokenizer.token_grid, size, size, decoding.dilate)
    if evaluating and not tokens.any():
        raise UserError(f"mask {mask.spec} leaves no token unknown; nothing to complete or score "
                        "(choose a ratio above 0 or a larger region)")


def triplet_rows(completion: Completion, limit: int) -> list[torch.Tensor]:
    """original, shown, result of the batch's first `limit` images, in grid order (3 per row)."""
    return [image for i in range(min(limit, len(completion.indices)))
            for image in (completion.original[i], completion.shown[i], completion.result[i])]


def save_grid(tiles: list[torch.Tensor], path: Path, png: str = "truncate", by_image: bool = True) -> None:
    """Triplet tiles (from `triplet_rows`) as a PNG, written atomically: one row per image (original | masked
    | result), or with `by_image=False` three rows (originals, masked inputs, results), one column per image."""
    from torchvision.utils import make_grid

    from mage_bench.io import atomic_open
    from mage_bench.samples import encode_png, to_uint8

    if not by_image:
        tiles = tiles[0::3] + tiles[1::3] + tiles[2::3]
    grid = make_grid(torch.stack(tiles), nrow=3 if by_image else len(tiles) // 3, padding=1, pad_value=1.0)
    with atomic_open(path, "wb") as handle:
        encode_png(to_uint8(grid, png).permute(1, 2, 0).numpy(), handle)


# --------------------------------------------------------------------------------------------
# Where the images come from


class FolderImages:
    """The images directly in a folder, sorted by name, in the run's evaluation view (resize + centre crop)."""

    def __init__(self, folder: Path, image_size: int, resize: str) -> None:
        from mage_bench.data import list_files

        self.files = list_files(folder)
        if not self.files:
            raise UserError(f"{folder} holds no images; give a folder of images or a data set (digits, ...)")
        from mage_bench.data import image_transform

        self.transform = image_transform(image_size, train=False, resize=resize)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(self.files[index]) as image:
                return self.transform(image.convert("RGB")), -1
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"{self.files[index]} is not a readable image ({exc}); remove or replace it") from None


def source_images(run: Any, images: str, split: str = "test") -> tuple[Any, str]:
    """(a data set of (image, label), its description): a folder of images, or a data set's split, in
    the run's image size and evaluation view."""
    from mage_bench.data import DATASETS, DatasetSpec, create_dataset

    data = run.config.data
    if Path(images).is_dir():
        return FolderImages(Path(images), data.image_size, data.resize), str(images)
    if DatasetSpec.parse(images).name not in DATASETS:
        raise UserError(f"--images {images!r} is neither a folder nor a data set ({', '.join(DATASETS.names())})")
    dataset = create_dataset(dataclasses.replace(data, name=images), split, train_transform=False)
    return dataset, f"{images} {split}"


def batches(dataset: Any, count: int, num_workers: int = 0, batch_size: int = DECODE_BATCH) -> Iterator[Any]:
    """(indices, images) of the data set's first `count` images, `batch_size` at a time, decoded by
    `num_workers` DataLoader workers (folder data: JPEG decoding would otherwise starve a GPU)."""
    from torch.utils.data import DataLoader, Subset

    loader = DataLoader(Subset(dataset, range(count)), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    start = 0
    for images, _ in loader:
        yield list(range(start, start + len(images))), images
        start += len(images)


def loader_workers(data: Any, dataset: Any) -> int:
    """DataLoader workers for `dataset`: the data config's for folder data, none for tensors in memory."""
    return data.num_workers if isinstance(dataset, FolderImages) or not hasattr(dataset, "tensors") else 0


# --------------------------------------------------------------------------------------------
# The command


def inpaint_images(run_dir: str | Path, images: str, mask: str, out_dir: str | Path, num: int | None = 64,
                   split: str | None = None, steps: int | None = None, temperature: float | None = None,
                   argmax: bool = False, paste_back: bool = False, dilate: int = 0, seed: int = 0,
                   device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Complete the first `num` images of `images` (a folder, or a data set's `split`, default test) under
    `mask`; write triplets, a grid and the manifest into `out_dir`, published whole (a failure leaves the
    folder as it was); returns the manifest. A folder holding other output is refused."""
    import json

    from tqdm import tqdm

    from mage_bench.io import atomic_write_json, sha256_file, utc_now
    from mage_bench.mage.inpaint_masks import PIXEL, parse_mask
    from mage_bench.runs import load_run
    from mage_bench.samples import png_pool, to_uint8, write_pngs

    parsed = parse_mask(mask)  # a typo fails before the run is loaded
    if num is not None and num < 1:
        raise UserError(f"--num must be >= 1, not {num}")
    if dilate and parsed.space != PIXEL:
        raise UserError(f"--dilate grows pixel masks (box, border, pixels), not {parsed.spec}; drop --dilate")
    if split is not None and Path(images).is_dir():
        raise UserError(f"--split applies to a data set, not to the folder {images}; drop --split")
    run = load_run(run_dir, device)
    decoding = decoding_of(run, steps, temperature, argmax, paste_back, dilate, seed)
    check_mask(run, parsed, decoding)
    dataset, description = source_images(run, images, split or "test")
    count = len(dataset) if num is None else min(num, len(dataset))
    out = Path(out_dir)
    manifest = {"run": str(run_dir), "checkpoint_sha256": run.checkpoint_sha256, "images": description,
                "count": count, "mask": parsed.spec, **decoding.fields(), "png": run.config.generate.png}
    if parsed.family == "pixels":
        manifest["mask_sha256"] = sha256_file(parsed.where)
    previous = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).is_file() else None
    same = previous is not None and {k: v for k, v in previous.items() if k != "created_at"} == manifest
    if out.exists() and any(out.iterdir()) and not same:
        raise UserError(f"{out} is not empty and holds no inpainting of these settings; choose an empty --out")
    tiles: list[torch.Tensor] = []
    bar = tqdm(total=count, desc=f"inpaint {parsed.spec}", unit="img", file=sys.stderr, disable=not progress)
    with publish_folder(out) as staging, png_pool() as pool:
        for indices, batch in batches(dataset, count, loader_workers(run.config.data, dataset)):
            done = complete_batch(run, batch, indices, parsed, decoding, device)
            tiles += triplet_rows(done, GRID_IMAGES - len(tiles) // 3)
            items = []
            for kind, pixels in (("original", done.original), ("masked", done.shown), ("result", done.result)):
                arrays = to_uint8(pixels, run.config.generate.png).permute(0, 2, 3, 1).numpy()
                items += [(staging / f"{i:06d}-{kind}.png", a) for i, a in zip(indices, arrays, strict=True)]
            write_pngs(items, pool, atomic=False)  # the folder is published whole
            bar.update(len(indices))
        bar.close()
        save_grid(tiles, staging / GRID, run.config.generate.png)
        atomic_write_json(staging / MANIFEST, {**manifest, "created_at": utc_now()})
    return manifest


@contextlib.contextmanager
def publish_folder(folder: Path) -> Iterator[Path]:
    """A staging folder beside `folder`, swapped onto it when the block succeeds (an older copy is removed);
    a failure leaves the older copy in place and no staging folder. For one writer at a time (a run's
    evaluation job, one `inpaint` command per output folder): the swap takes no lock."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.staging-", dir=folder.parent))
    try:
        yield staging
        replace_folder(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_folder(new: Path, folder: Path) -> None:
    """Put folder `new` in place of `folder` (which may not exist): two renames, then the old copy is removed."""
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.rename(folder, old)
    os.rename(new, folder)
    shutil.rmtree(old, ignore_errors=True)
