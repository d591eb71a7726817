"""Tokens of a folder data set's fixed training views, computed once (`data.cache_tokens`).

MAGE pre-training runs the VQGAN encoder on a fresh random crop of every image at every step; at ViT-B
scale that costs about as much as the ViT's forward and backward. MAR's cached-latent training instead
encodes each image once per fixed view, the centre crop and its horizontal flip, and trains on those. So
does this module: `view_tokens` returns int[N, 2, L] (view 0: the centre crop, the evaluation transform;
view 1: its mirror image), and training draws one of the two per image and step (`train.augment:
center-flip`, recorded in the run's config: the random resized crops are gone, which the sweep's confound
checks see like any other setting).

The cache lives in `$MAGE_BENCH_CACHE/tokens/<key>/` (default ~/.cache/mage-bench), keyed by what makes the
tokens: the tokenizer's weights (sha256), the data set's identity (resolved path and file listing) and
pixel settings, the views and the encoder's precision (fp16 autocast on GPUs, as training tokenises, or
fp32). It is written in chunks of `CHUNK_IMAGES` images, each atomically: an interrupted build keeps its
finished chunks, and under torchrun every process builds its share of the chunks before all of them read
the whole.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

VIEWS = ("center-crop", "center-crop-hflip")
CHUNK_IMAGES = 2048
FORMAT = 1
INFO_FILE = "cache.json"


def cache_root() -> Path:
    from mage_bench.eval.image_sets import DEFAULT_CACHE

    return DEFAULT_CACHE / "tokens"


def cache_key(tokenizer: str, data: Any, dataset: Any, encode: str) -> dict[str, Any]:
    """What the cached tokens depend on (the folder name is its digest). `encode`: fp16-autocast | fp32."""
    from mage_bench.data import dataset_identity, pixel_settings
    from mage_bench.tokenizer import tokenizer_identity

    return {"format": FORMAT, "tokenizer": tokenizer_identity(tokenizer), "data": pixel_settings(data),
            "dataset_identity": dataset_identity(dataset), "views": list(VIEWS), "encode": encode}


def cache_folder(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return cache_root() / digest[:24]


def _chunk_path(folder: Path, chunk: int) -> Path:
    return folder / f"chunk-{chunk:06d}.pt"


def view_tokens(key: dict[str, Any], dataset: Any, tokenize: Callable[[torch.Tensor], torch.Tensor],
                rank: int = 0, world: int = 1, num_workers: int = 0, progress: bool = False,
                batch_size: int = 64) -> tuple[torch.Tensor, dict[str, Any]]:
    """(tokens int[N, 2, L] on the CPU, the cache's description) for `dataset` (its evaluation transform:
    resize + centre crop), building the chunks that are missing first: chunk c by process c mod `world`.

    `tokenize` maps images float[B, 3, H, W] to tokens (B, L) on any device. Collective under torchrun
    (every process must call it: they wait for each other before reading the chunks)."""
    import torch.distributed as dist
    from tqdm import tqdm

    from mage_bench.io import atomic_torch_save, atomic_write_json, safe_torch_load

    folder = cache_folder(key)
    folder.mkdir(parents=True, exist_ok=True)
    chunks = math.ceil(len(dataset) / CHUNK_IMAGES)
    mine = [c for c in range(chunks) if c % world == rank and not _chunk_path(folder, c).is_file()]
    tic = time.perf_counter()
    total = sum(min(CHUNK_IMAGES, len(dataset) - c * CHUNK_IMAGES) for c in mine)
    with tqdm(total=total, desc="tokenising the cached views", unit="img", disable=not progress or not mine,
              dynamic_ncols=True) as bar:
        for chunk in mine:
            lo, hi = chunk * CHUNK_IMAGES, min((chunk + 1) * CHUNK_IMAGES, len(dataset))
            atomic_torch_save({"tokens": _tokenize_range(dataset, lo, hi, tokenize, num_workers, batch_size, bar)},
                              _chunk_path(folder, chunk))
    built_s = time.perf_counter() - tic
    if world > 1 and dist.is_initialized():
        dist.barrier()  # every chunk is on disk
    tokens = torch.cat([safe_torch_load(_chunk_path(folder, c))["tokens"] for c in range(chunks)])
    if tokens.shape[0] != len(dataset) or tokens.shape[1] != len(VIEWS):
        raise RuntimeError(f"token cache {folder} holds {tuple(tokens.shape)} tokens for {len(dataset)} images; "
                           "delete the folder to rebuild it")
    info = {**key, "folder": str(folder), "images": len(dataset), "tokens_per_view": tokens.shape[2],
            "chunks": chunks}
    if rank == 0 and not (folder / INFO_FILE).is_file():
        atomic_write_json(folder / INFO_FILE, info)
    return tokens, {**info, "built_chunks": len(mine), "build_s": round(built_s, 2)}


@torch.no_grad()
def _tokenize_range(dataset: Any, lo: int, hi: int, tokenize: Callable[[torch.Tensor], torch.Tensor],
                    num_workers: int, batch_size: int, bar: Any) -> torch.Tensor:
    """int[hi - lo, 2, L]: each image's tokens, then its mirror image's (int16 when the codes fit)."""
    from torch.utils.data import DataLoader, Subset

    loader = DataLoader(Subset(dataset, range(lo, hi)), batch_size=batch_size, num_workers=num_workers)
    parts = []
    for images, _ in loader:
        both = tokenize(torch.cat([images, images.flip(-1)])).cpu()  # one encoder call for both views
        parts.append(torch.stack([both[:len(images)], both[len(images):]], dim=1))
        bar.update(len(images))
    tokens = torch.cat(parts)
    return tokens.to(torch.int16) if int(tokens.max()) < 2**15 else tokens.to(torch.int32)
