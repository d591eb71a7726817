"""`mage-bench generate`: decode images from a trained run into PNG files, streamed to disk.

Images are written batch by batch (never all held in memory) as `NNNNNN.png`, with a
`generation.json` manifest of the settings and a `grid.png` of the first images. Rerunning the same
command skips images already on disk; other settings in a non-empty folder are refused.

A batch's PNGs are encoded by a thread pool (PIL releases the GIL while compressing) under hidden
temporary names, each fsynced by its thread, and renamed onto their final `NNNNNN.png` names only once
the whole batch is on disk (then the folder is fsynced once). So a final name always holds a complete
image, even after a power loss, and resume may trust it; a killed run leaves only hidden `*.partial`
files, which resume ignores and removes (`remove_partials`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch

from mage_bench.errors import UserError
from mage_bench.io import atomic_open, atomic_write_json, fsync_folder, slug, utc_now

MANIFEST = "generation.json"
GRID = "grid.png"
PARTIAL = ".partial"  # suffix of a PNG being written; never an image suffix, so no reader lists it
PARTIAL_MAX_AGE_S = 24 * 3600  # a partial file of another machine this old belongs to no live writer


def to_uint8(image: torch.Tensor, png: str = "truncate") -> torch.Tensor:
    """[0, 1] float pixels -> uint8: "truncate" as the official `(x * 255).astype(uint8)`, or "round"."""
    scaled = image.clamp(0, 1) * 255
    return (scaled.round() if png == "round" else scaled.floor()).to(torch.uint8)


def _save_png(image: torch.Tensor, path: Path, png: str = "truncate") -> None:
    """One image (the grid) written atomically; the samples themselves go through `write_pngs`."""
    array = to_uint8(image, png).permute(1, 2, 0).cpu().numpy()
    with atomic_open(path, "wb") as handle:
        encode_png(array, handle)


# --------------------------------------------------------------------------------------------
# Batched PNG writing


def png_threads() -> int:
    """Encoder threads: the CPUs this process may use, at most 8 (beyond that the disk is the limit)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cpus))


@contextlib.contextmanager
def png_pool(threads: int | None = None) -> Iterator[Executor]:
    """A thread pool for `write_pngs`, shared by every batch of one folder."""
    with ThreadPoolExecutor(max_workers=threads or png_threads(), thread_name_prefix="png") as pool:
        yield pool


def encode_png(array: Any, handle: Any) -> None:
    """One uint8 HxWx3 array as PNG, with PIL's default PNG settings (what every writer here uses)."""
    from PIL import Image

    Image.fromarray(array).save(handle, format="PNG")


def _host() -> str:
    return slug(socket.gethostname(), limit=30, empty="host").replace(".", "-")  # no dot: names split on dots


def _partial_name(path: Path) -> Path:
    # The writer's host and pid are in the name, so a later run can tell a dead writer's leftovers.
    return path.with_name(f".{path.name}.{_host()}.{os.getpid()}.{secrets.token_hex(4)}{PARTIAL}")


def _write_one(array: Any, path: Path) -> None:
    with open(path, "xb") as handle:  # "x": never onto another writer's file
        encode_png(array, handle)
        handle.flush()
        os.fsync(handle.fileno())  # in the worker thread: the batch's fsyncs overlap


def write_pngs(items: Sequence[tuple[Path, Any]], pool: Executor | None = None, atomic: bool = True) -> None:
    """Write a batch of (path, uint8 HxWx3 array) as PNG files, encoded and fsynced by `pool`'s threads.

    atomic: each file is written under a hidden `*.partial` name in its folder, and the batch is renamed onto
    its final names only after every file of it is on disk; an error removes the batch's partial files, so
    no final name ever holds a truncated file. Not atomic: straight to the final names (for a staging folder
    that is itself published atomically), still fsynced so a published folder is complete after a crash.
    """
    if not items:
        return
    if pool is None:
        with png_pool() as own:
            return write_pngs(items, own, atomic)
    targets = [_partial_name(path) if atomic else path for path, _ in items]
    futures = [pool.submit(_write_one, array, target) for (_, array), target in zip(items, targets, strict=True)]
    try:
        wait(futures)  # every thread done before any clean-up, so none writes after it
        for future in futures:
            future.result()  # the first error, if any
        if atomic:
            for (path, _), target in zip(items, targets, strict=True):
                os.replace(target, path)
    except BaseException:
        for future in futures:
            future.cancel()
        wait(futures)
        if atomic:
            for target in targets:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(target)
        raise
    for folder in {path.parent for path, _ in items}:
        fsync_folder(folder)  # the renames (or new names) survive a power loss


def remove_partials(folder: Path) -> int:
    """Remove the `*.partial` files that writers killed mid-batch left in `folder`; returns how many.

    A file of a writer still running (this host, a live pid) is kept: two generations may share a folder."""
    removed = 0
    for path in folder.glob(f".*{PARTIAL}"):
        with contextlib.suppress(FileNotFoundError):
            if _abandoned(path):
                path.unlink()
                removed += 1
    return removed


def _abandoned(path: Path) -> bool:
    """Whether no live writer owns the partial file `path` (named by `_partial_name`)."""
    parts = path.name[: -len(PARTIAL)].rsplit(".", 3)  # [".NNNNNN.png", host, pid, token]
    if len(parts) == 4 and parts[1] == _host() and parts[2].isdigit():
        return int(parts[2]) != os.getpid() and not _alive(int(parts[2]))
    # Another host's (or an unknown) writer: its pid means nothing here; only its age tells.
    return time.time() - path.stat().st_mtime > PARTIAL_MAX_AGE_S


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _load_png(path: Path) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255


def render_uint8(loaded: Any, indices: list[int], steps: int, temperature: float, seed: int) -> torch.Tensor:
    """The images `indices` of the run decoded and quantised exactly as `generate_images` writes them to PNG
    (lossless): uint8 [B, 3, H, W] on the model's device. Each image's noise is seeded by its index."""
    from mage_bench.mage.generate import decoding_noise, iterative_decode

    num_tokens = loaded.config.model.num_tokens
    side = int(round(num_tokens ** 0.5))
    noise = decoding_noise(seed, indices, steps, num_tokens)
    tokens = iterative_decode(loaded.model, noise, steps, temperature)  # (B, L)
    images = loaded.tokenizer.decode(tokens.view(-1, side, side))  # (B, 3, H, W) in [0, 1]
    return to_uint8(images, loaded.config.generate.png)


def generate_images(run_dir: str | Path | Any, num: int, out_dir: str | Path, steps: int | None = None,
                    temperature: float | None = None, seed: int = 0, batch_size: int = 64,
                    progress: bool = True, device: str = "cpu") -> dict[str, Any]:
    """Decode `num` images from the run's checkpoint into `out_dir`; returns the manifest.

    `run_dir` is a run folder or a `LoadedRun` (to reuse a model already loaded)."""
    from torchvision.utils import make_grid
    from tqdm import tqdm

    from mage_bench.mage.generate import batched
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
    remove_partials(out)  # a killed run's unfinished batch: its images are regenerated below
    todo = [i for i in range(num) if not (out / f"{i:06d}.png").exists()]
    bar = tqdm(total=num, initial=num - len(todo), desc="generate", unit="img", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    with png_pool() as pool:
        for indices in batched(todo, batch_size):
            arrays = render_uint8(loaded, indices, steps, temperature, seed).permute(0, 2, 3, 1).cpu().numpy()
            write_pngs([(out / f"{index:06d}.png", array) for index, array in zip(indices, arrays, strict=True)],
                       pool)
            bar.update(len(indices))
    bar.close()
    # The grid is rebuilt from the files, so a resumed generation gets the same grid.
    first = torch.stack([_load_png(out / f"{i:06d}.png") for i in range(min(num, 64))])
    _save_png(make_grid(first, nrow=8, padding=2, pad_value=1.0), out / GRID)
    manifest.update(num=max(num, previous.get("num", 0) if previous else 0), created_at=utc_now())
    atomic_write_json(out / MANIFEST, manifest)
    return manifest
