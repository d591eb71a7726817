"""Probe features of a MAGE run, extracted once and cached on disk.

The feature is the official linear-probe one (`MAGE.features`: mean of last-block tokens without
the class token, through a parameter-free LayerNorm; nothing masked or dropped), computed in
batches under `torch.inference_mode` and streamed into a memory-mapped .npy, so memory stays flat
in the number of images. The cache key names everything that changes the values: the checkpoint's
sha256, the data set config and the data set's identity (`data.dataset_identity`: its resolved path and
file listing, so a relative `imagefolder:data/x` run from another folder does not reuse these features),
the split, the transform, the layer and the pooling. Not the batch size: features do not depend on it
beyond float noise. Every file is written through `mage_bench.io` (a temporary name, then a rename), so a
crash never leaves a half cache.

Images per batch: `EvalConfig.feature_batch_size(image_size)` unless given (256 up to 128 px, fewer above:
the VQGAN's fp32 activations of 256 images at 256 px would need ~35 GB).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mage_bench.config import DataConfig, to_dict

# Bump when the feature definition or the key changes, to invalidate old caches (2: the data set identity)
FEATURE_VERSION = 2
LAYER, POOLING, TRANSFORM = "last_block", "mean_tokens_ln", "eval_resize_center_crop"


def cache_key(checkpoint_sha256: str, data: DataConfig, split: str, identity: str) -> str:
    """The cache name of a split's features; `identity` is `data.dataset_identity` of that split."""
    from mage_bench.data import pixel_settings

    spec = {"checkpoint": checkpoint_sha256, "data": pixel_settings(data), "identity": identity, "split": split,
            "transform": TRANSFORM, "layer": LAYER, "pooling": POOLING, "version": FEATURE_VERSION}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


def probe_features(run: Any, images: Any) -> Any:
    """float32 [B, D] probe features of images float[B, 3, H, W] in [0, 1] already on the run's device:
    the run's tokenizer, then `MAGE.features`. The caller picks the grad mode (inference or no_grad)."""
    tokens = run.tokenizer.encode(images).flatten(1)
    return run.model.features(tokens).float()


def extract_features(run: str | Path | Any, data: DataConfig, split: str, batch_size: int | None = None,
                     device: str = "cpu", cache_dir: str | Path | None = None,
                     progress: bool = False, dataset: Any | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(features float32 [N, D] memory-mapped, labels int64 [N], info) for a run on a data split.

    `run` is a run folder or a `LoadedRun` (pass one to extract several splits with one load); `dataset`
    the split's evaluation data set when the caller made it already (listing ImageNet takes seconds).
    `batch_size`: images per tokenizer + encoder call; None: sized by the image size
    (`EvalConfig.feature_batch_size`). `info["batch_size"]` says which was used (or None on a cache hit).
    """
    import torch
    from tqdm import tqdm

    from mage_bench.config import DEFAULT_EVAL
    from mage_bench.data import create_dataset, dataset_identity
    from mage_bench.io import atomic_memmap, atomic_npy_save, atomic_write_json
    from mage_bench.runs import EVAL_DIR, LoadedRun, load_run

    loaded = run if isinstance(run, LoadedRun) else load_run(run, device)
    if dataset is None:  # its identity is part of the key
        dataset = create_dataset(data, split, train_transform=False)
    identity = dataset_identity(dataset)
    key = cache_key(loaded.checkpoint_sha256, data, split, identity)
    folder = Path(cache_dir) if cache_dir else loaded.path / EVAL_DIR / "cache"
    folder.mkdir(parents=True, exist_ok=True)
    feats_path, labels_path, meta_path = (folder / f"features-{key}{suffix}" for suffix in (".npy", ".labels.npy",
                                                                                             ".json"))
    info = {"cache_key": key, "checkpoint_sha256": loaded.checkpoint_sha256, "split": split, "layer": LAYER,
            "pooling": POOLING, "transform": TRANSFORM, "data": to_dict(data), "dataset_identity": identity}
    if meta_path.exists() and feats_path.exists() and labels_path.exists():
        hit = {**info, "cached": True, "batch_size": None}
        return np.load(feats_path, mmap_mode="r"), np.load(labels_path), hit

    if batch_size is None:
        batch_size = DEFAULT_EVAL.feature_batch_size(data.image_size)
    n, dim = len(dataset), loaded.config.model.embed_dim
    labels = np.empty(n, dtype=np.int64)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=data.num_workers)
    # Streamed into a memory-mapped file published only when complete (memory flat in the image count).
    with atomic_memmap(feats_path, (n, dim), np.float32) as features, torch.inference_mode():
        row = 0
        for images, targets in tqdm(loader, desc=f"features {split}", unit="batch", file=sys.stderr,
                                    disable=not progress):
            batch = probe_features(loaded, images.to(device)).cpu().numpy()
            features[row:row + len(batch)] = batch
            labels[row:row + len(batch)] = np.asarray(targets)
            row += len(batch)
    atomic_npy_save(labels_path, labels)
    atomic_write_json(meta_path, {**info, "n": n, "dim": dim, "batch_size": batch_size})  # written last: marks a complete cache
    return np.load(feats_path, mmap_mode="r"), labels, {**info, "cached": False, "batch_size": batch_size}
