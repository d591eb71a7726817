"""`mage-bench generate`: decode images from a trained run into PNG files, streamed to disk.

Images are written batch by batch (never all held in memory) as `NNNNNN.png`, with a
`generation.json` manifest of the settings and a `grid.png` of the first images. Rerunning the same
command skips images already on disk; other settings in a non-empty folder are refused.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from mage_bench.errors import UserError
from mage_bench.io import atomic_open, atomic_write_json, utc_now

MANIFEST = "generation.json"
GRID = "grid.png"


def to_uint8(image: torch.Tensor, png: str = "truncate") -> torch.Tensor:
    """[0, 1] float pixels -> uint8: "truncate" as the official `(x * 255).astype(uint8)`, or "round"."""
    scaled = image.clamp(0, 1) * 255
    return (scaled.round() if png == "round" else scaled.floor()).to(torch.uint8)


def _save_png(image: torch.Tensor, path: Path, png: str = "truncate") -> None:
    from PIL import Image

    array = to_uint8(image, png).permute(1, 2, 0).cpu().numpy()
    with atomic_open(path, "wb") as handle:
        Image.fromarray(array).save(handle, format="PNG")


def _load_png(path: Path) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255


def generate_images(run_dir: str | Path | Any, num: int, out_dir: str | Path, steps: int | None = None,
                    temperature: float | None = None, seed: int = 0, batch_size: int = 64,
                    progress: bool = True, device: str = "cpu") -> dict[str, Any]:
    """Decode `num` images from the run's checkpoint into `out_dir`; returns the manifest.

    `run_dir` is a run folder or a `LoadedRun` (to reuse a model already loaded)."""
    from torchvision.utils import make_grid
    from tqdm import tqdm

    from mage_bench.mage.generate import batched, decoding_noise, iterative_decode
    from mage_bench.runs import LoadedRun, load_run

    if num < 1 or batch_size < 1:
        raise UserError(f"--num ({num}) and the batch size ({batch_size}) must be >= 1")
    loaded = run_dir if isinstance(run_dir, LoadedRun) else load_run(run_dir, device)
    run_dir = loaded.path
    steps = loaded.config.generate.steps if steps is None else steps
    temperature = loaded.config.generate.temperature if temperature is None else temperature
    if steps < 1 or temperature < 0:
        raise UserError(f"--steps must be >= 1 and --temperature >= 0 (got {steps}, {temperature})")
    out = Path(out_dir)
    png = loaded.config.generate.png
    manifest = {"run": str(run_dir), "checkpoint_sha256": loaded.checkpoint_sha256, "step": loaded.step,
                "steps": steps, "temperature": temperature, "seed": seed, "png": png}
    previous = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).exists() else None
    # The same images need the same weights and decoding settings; how the run path is spelled does not matter.
    same = ("checkpoint_sha256", "steps", "temperature", "seed", "png")
    if previous is not None:
        previous = {"png": "round", **previous}  # manifests older than the png setting were rounded
    if previous is not None and any(previous.get(k) != manifest[k] for k in same):
        raise UserError(f"{out} holds images made with other settings ({out / MANIFEST}); choose another --out")
    if previous is None and out.exists() and any(out.glob("*.png")):
        raise UserError(f"{out} already holds PNG files of unknown origin; choose an empty --out")
    out.mkdir(parents=True, exist_ok=True)
    if previous is None:  # claim the folder first, so a run killed mid-way is recognised and refilled
        atomic_write_json(out / MANIFEST, {**manifest, "num": 0, "created_at": utc_now()})
    todo = [i for i in range(num) if not (out / f"{i:06d}.png").exists()]
    bar = tqdm(total=num, initial=num - len(todo), desc="generate", unit="img", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    L = loaded.config.model.num_tokens
    side = int(round(L ** 0.5))
    for indices in batched(todo, batch_size):
        noise = decoding_noise(seed, indices, steps, L)
        tokens = iterative_decode(loaded.model, noise, steps, temperature)  # (B, L)
        images = loaded.tokenizer.decode(tokens.view(-1, side, side))  # (B, 3, H, W) in [0, 1]
        for index, image in zip(indices, images, strict=True):
            _save_png(image, out / f"{index:06d}.png", png)
        bar.update(len(indices))
    bar.close()
    # The grid is rebuilt from the files, so a resumed generation gets the same grid.
    first = torch.stack([_load_png(out / f"{i:06d}.png") for i in range(min(num, 64))])
    _save_png(make_grid(first, nrow=8, padding=2, pad_value=1.0), out / GRID)
    manifest.update(num=max(num, previous.get("num", 0) if previous else 0), created_at=utc_now())
    atomic_write_json(out / MANIFEST, manifest)
    return manifest
