"""What an inpainting run leaves unknown: named, seeded mask families, and the pixel-to-token overlap rule.

A mask SPEC is `FAMILY:ARGUMENT`; `MASK_FAMILIES` is the registry (adding a family is one registration):

- `random:R`     token space: ceil(R * L) tokens unknown per image (the official training rule's count),
                 drawn per image from (seed, image index), so an image's mask does not depend on its batch.
- `box:WHERE`    pixel space: `center` (the middle half of each side, a quarter of the image),
                 `half-left`, `half-right`, `half-top`, `half-bottom`.
- `border:W`     pixel space, outpainting: a frame W pixels wide along every edge is unknown.
- `pixels:FILE`  pixel space: a mask image the size of the run's images; white (> 127 in grayscale) is
                 unknown, black known.

Pixel-space masks become token masks by the overlap rule of the maintainer's recipe (LTH14/mage#49): a
token is unknown when any pixel of its patch is; `dilate` grows that token mask by whole tokens (the
maintainer masks one more ring, LTH14/mage#3, so no known token records the mask's edge). Before
tokenising, the unknown pixels are set to zero ("pad the raw pixels with zero", LTH14/mage#3), so the
known tokens cannot carry what the mask hides. Token-space masks hide tokens of the intact image, as
training does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mage_bench.errors import UserError
from mage_bench.registry import Registry

MASK_STREAM = 0x6D61736B  # the third SeedSequence word of a mask draw ("mask"), apart from decoding's noise
TOKEN, PIXEL = "token", "pixel"  # the space a family masks in


@dataclass(frozen=True)
class InpaintMask:
    """One parsed mask spec. Token families implement `tokens`, pixel families `pixels`."""

    spec: str  # canonical, e.g. "random:0.5", "box:center", "border:4"
    family: str
    space: str  # TOKEN | PIXEL
    nominal_ratio: float | None = None  # random:R -> R; geometric families: None (their ratio is realised)
    where: str = ""  # box side, border width or mask file (the family's argument, parsed)

    def tokens(self, grid: int, seed: int, index: int) -> np.ndarray:
        """bool[grid, grid], True = unknown, for image `index` under `seed` (token families)."""
        return MASK_FAMILIES.get(self.family).rule(self, grid, seed, index)

    def pixels(self, height: int, width: int) -> np.ndarray:
        """bool[height, width], True = unknown (pixel families; the same for every image)."""
        return MASK_FAMILIES.get(self.family).rule(self, height, width)


@dataclass(frozen=True)
class MaskFamily:
    parse: Callable[[str], InpaintMask]  # the spec's argument -> the mask (a bad one: UserError)
    # token space: (mask, grid, seed, index) -> bool[grid, grid]; pixel space: (mask, H, W) -> bool[H, W]
    rule: Callable[..., np.ndarray]


MASK_FAMILIES: Registry[MaskFamily] = Registry("mask family")


def parse_mask(spec: str) -> InpaintMask:
    """`FAMILY:ARGUMENT` -> InpaintMask; an unknown family or a bad argument is a one-line UserError."""
    family, _, argument = spec.strip().partition(":")
    return MASK_FAMILIES.get(family).parse(argument)


def parse_masks(specs: str | Sequence[str]) -> list[InpaintMask]:
    """A comma-separated list (the CLI's --masks) or a sequence of specs; each spec once, in order."""
    items = specs.split(",") if isinstance(specs, str) else list(specs)
    masks = [parse_mask(item) for item in items if item.strip()]
    if not masks:
        raise UserError("no mask given; e.g. --masks random:0.25,random:0.5,box:center,border:4")
    return list({mask.spec: mask for mask in masks}.values())


# --------------------------------------------------------------------------------------------
# Families


def _random(argument: str) -> InpaintMask:
    try:
        ratio = float(argument)
    except ValueError:
        raise UserError(f"mask random:{argument}: the ratio must be a number in [0, 1], e.g. random:0.5") from None
    if not 0 <= ratio <= 1:
        raise UserError(f"mask random:{argument}: the ratio must be in [0, 1]")
    return InpaintMask(f"random:{ratio:g}", "random", TOKEN, nominal_ratio=ratio)


def _random_tokens(mask: InpaintMask, grid: int, seed: int, index: int) -> np.ndarray:
    length = grid * grid
    count = math.ceil(round(mask.nominal_ratio * length, 9))  # the official int(np.ceil(L * ratio))
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, MASK_STREAM]))
    unknown = np.zeros(length, dtype=bool)
    unknown[rng.permutation(length)[:count]] = True
    return unknown.reshape(grid, grid)


BOXES = {  # (top, bottom, left, right) as fractions of the side
    "center": (0.25, 0.75, 0.25, 0.75),
    "half-left": (0.0, 1.0, 0.0, 0.5), "half-right": (0.0, 1.0, 0.5, 1.0),
    "half-top": (0.0, 0.5, 0.0, 1.0), "half-bottom": (0.5, 1.0, 0.0, 1.0),
}


def _box(argument: str) -> InpaintMask:
    if argument not in BOXES:
        raise UserError(f"mask box:{argument}: unknown box; use one of {', '.join('box:' + b for b in BOXES)}")
    return InpaintMask(f"box:{argument}", "box", PIXEL, where=argument)


def _box_pixels(mask: InpaintMask, height: int, width: int) -> np.ndarray:
    top, bottom, left, right = BOXES[mask.where]
    unknown = np.zeros((height, width), dtype=bool)
    unknown[round(top * height):round(bottom * height), round(left * width):round(right * width)] = True
    return unknown


def _border(argument: str) -> InpaintMask:
    if not argument.isdigit() or int(argument) < 1:
        raise UserError(f"mask border:{argument}: the width must be a whole number of pixels >= 1, e.g. border:4")
    return InpaintMask(f"border:{int(argument)}", "border", PIXEL, where=str(int(argument)))


def _border_pixels(mask: InpaintMask, height: int, width: int) -> np.ndarray:
    frame = int(mask.where)
    if 2 * frame >= min(height, width):
        raise UserError(f"mask {mask.spec}: a {frame}-pixel border leaves nothing known in {width}x{height} "
                        f"images; use a width of at most {(min(height, width) - 1) // 2}")
    unknown = np.ones((height, width), dtype=bool)
    unknown[frame:height - frame, frame:width - frame] = False
    return unknown


def _pixels(argument: str) -> InpaintMask:
    path = Path(argument).expanduser()
    if not argument or not path.is_file():
        raise UserError(f"mask pixels:{argument}: no such mask image; give a PNG the size of the run's images "
                        "(white = unknown)")
    # Resolved now: a sweep's evaluation job may run in another working folder.
    return InpaintMask(f"pixels:{argument}", "pixels", PIXEL, where=str(path.resolve()))


def _pixels_from_file(mask: InpaintMask, height: int, width: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(mask.where) as image:
            gray = np.asarray(image.convert("L"))
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"mask {mask.spec}: not a readable image ({exc})") from None
    if gray.shape != (height, width):
        raise UserError(f"mask {mask.spec} is {gray.shape[1]}x{gray.shape[0]} but the images are {width}x{height}; "
                        "resize the mask image to match")
    return gray > 127


MASK_FAMILIES.register("random")(MaskFamily(_random, _random_tokens))
MASK_FAMILIES.register("box")(MaskFamily(_box, _box_pixels))
MASK_FAMILIES.register("border")(MaskFamily(_border, _border_pixels))
MASK_FAMILIES.register("pixels")(MaskFamily(_pixels, _pixels_from_file))


def check_masks_fit(specs: Sequence[str], image_size: int) -> None:
    """Fail (one line) unless every mask applies to `image_size`-pixel images and leaves something unknown:
    what a sweep checks before any training."""
    for mask in parse_masks(specs):
        if mask.space == PIXEL:
            nothing = not mask.pixels(image_size, image_size).any()
        else:
            nothing = mask.nominal_ratio == 0
        if nothing:
            raise UserError(f"mask {mask.spec} leaves nothing unknown in {image_size}x{image_size} images; "
                            "nothing to complete or score (choose a ratio above 0 or a larger region)")


# --------------------------------------------------------------------------------------------
# From pixels to tokens


def overlapping_tokens(pixels: np.ndarray, grid: int) -> np.ndarray:
    """bool[..., H, W] pixel mask -> bool[..., grid, grid]: a token is unknown when any pixel of its patch is."""
    *lead, height, width = pixels.shape
    if height % grid or width % grid:
        raise UserError(f"{width}x{height} images do not split into a {grid}x{grid} token grid")
    patches = pixels.reshape(*lead, grid, height // grid, grid, width // grid)
    return patches.any(axis=(-3, -1))


def dilate_tokens(tokens: np.ndarray, rings: int) -> np.ndarray:
    """Grow a bool[..., h, w] token mask by `rings` tokens (8-neighbourhood)."""
    for _ in range(rings):
        padded = np.pad(tokens, [(0, 0)] * (tokens.ndim - 2) + [(1, 1), (1, 1)])
        h, w = tokens.shape[-2:]
        tokens = np.logical_or.reduce([padded[..., dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)])
    return tokens


def token_patches(tokens: np.ndarray, height: int, width: int) -> np.ndarray:
    """bool[..., h, w] token mask -> bool[..., H, W]: each token's patch of pixels."""
    h, w = tokens.shape[-2:]
    return tokens.repeat(height // h, axis=-2).repeat(width // w, axis=-1)


def masks_for(mask: InpaintMask, indices: Sequence[int], seed: int, grid: int, height: int, width: int,
              dilate: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(unknown tokens bool[B, grid, grid], unknown pixels bool[B, H, W]) of images `indices`.

    Token families: the pixels are the unknown tokens' patches. Pixel families: the tokens follow the
    overlap rule (then `dilate`), the pixels are the family's own (what is zeroed before tokenising)."""
    if mask.space == TOKEN:
        tokens = np.stack([mask.tokens(grid, seed, i) for i in indices])
        return tokens, token_patches(tokens, height, width)
    pixels = np.broadcast_to(mask.pixels(height, width), (len(indices), height, width))
    return dilate_tokens(overlapping_tokens(pixels, grid), dilate), np.array(pixels)
