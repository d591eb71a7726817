"""Training step time on folder data with and without cached tokens (`data.cache_tokens`).

    python tests/benchmarks/cached_tokens.py [--steps 20] [--batch-size 64] [--paper]

Figures, not assertions. A folder of random PNGs (`--images` per class, 2 classes, 48x40 px, or 300x280 px
with `--paper`) and a random-weight tokenizer: by default vq_digits at 32 px (8x8 tokens) under mage_small,
with `--paper` the official VQGAN at 256 px under ViT-B (a few steps: slow on a CPU). Printed: the time per
step with fresh random crops tokenised every step (`train.augment: dataset`), with the cached centre crop or
its flip (`data.cache_tokens`), the ratio, and the one-off time to build the cache. Random weights do the
same work as trained ones.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def make_inputs(root: Path, images: int, paper: bool) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import write_image_folder

    from mage_bench.tokenizer import create_tokenizer, tokenizer_payload

    data = write_image_folder(root / "data", {"train": images, "val": 2}, shape=(300, 280, 3) if paper else (48, 40, 3))
    tokenizer = root / "vq"
    tokenizer.mkdir()
    torch.manual_seed(0)
    vq = create_tokenizer("vqgan_mage") if paper else create_tokenizer("vq_digits", resolution=32)
    torch.save(tokenizer_payload(vq), tokenizer / "tokenizer.pt")
    return data, tokenizer


def step_time(data: Path, tokenizer: Path, cached: bool, batch: int, steps: int, paper: bool,
              cache_root: Path) -> tuple[float, float]:
    """(seconds per training step, seconds to set the trainer up: the cache build when `cached`)."""
    from mage_bench import token_cache
    from mage_bench.config import RunConfig, resolve_config
    from mage_bench.train import Trainer, WindowedSteps, resolve_run_config, setup_runtime

    token_cache.cache_root = lambda: cache_root  # a fresh cache: the build is timed too
    model = {"name": "mage_vit_base_patch16"} if paper else {"name": "mage_small"}
    layer = {"data": {"name": f"imagefolder:{data}", "image_size": 256 if paper else 32, "cache_tokens": cached},
             "tokenizer": str(tokenizer), "model": model, "masking": {"mask_ratio_min": 0.5},
             "train": {"steps": 10_000, "batch_size": batch, "proxy_every": 0, "device": "cpu"}}
    config = resolve_run_config(resolve_config(RunConfig, layer))
    tic = time.perf_counter()
    loop = WindowedSteps(Trainer(config, setup_runtime(config)))
    setup_s = time.perf_counter() - tic
    loop.train_step(0)  # warm-up
    tic = time.perf_counter()
    for step in range(1, steps + 1):
        loop.train_step(step)
    return (time.perf_counter() - tic) / steps, setup_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=256, help="images per class (2 classes)")
    parser.add_argument("--paper", action="store_true", help="256 px, official VQGAN, ViT-B")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, tokenizer = make_inputs(root, args.images, args.paper)
        fresh, _ = step_time(data, tokenizer, False, args.batch_size, args.steps, args.paper, root / "c0")
        cached, build = step_time(data, tokenizer, True, args.batch_size, args.steps, args.paper, root / "c1")
    what = "256 px, vqgan_mage, mage_vit_base_patch16" if args.paper else "32 px, vq_digits, mage_small"
    print(f"training step, {what}, batch {args.batch_size}, {2 * args.images} images, {torch.get_num_threads()} "
          f"threads: random crops tokenised every step {1000 * fresh:.1f} ms, cached tokens {1000 * cached:.1f} ms "
          f"({fresh / cached:.2f}x); building the cache took {build:.1f} s")


if __name__ == "__main__":
    main()
