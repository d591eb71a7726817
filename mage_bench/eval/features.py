"""Probe features of a MAGE run, extracted once and cached on disk.

The feature is the official linear-probe one (`MAGE.features`: mean of last-block tokens without
the class token, through a parameter-free LayerNorm; nothing masked or dropped), computed in
batches under `torch.inference_mode` and streamed into a memory-mapped .npy, so memory stays flat
in the number of images. The cache key names everything that changes the values: the checkpoint's
sha256, the data set config, the split, the transform, the layer and the pooling. Files are
written to a temporary name and renamed, so a crash never leaves a half cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mage_bench.config import DataConfig, to_dict

FEATURE_VERSION = 1  # bump when the feature definition changes, to invalidate old caches
LAYER, POOLING, TRANSFORM = "last_block", "mean_tokens_ln", "eval_resize_center_crop"


def cache_key(checkpoint_sha256: str, data: DataConfig, split: str) -> str:
    spec = {"checkpoint": checkpoint_sha256, "data": to_dict(data), "split": split, "transform": TRANSFORM,
            "layer": LAYER, "pooling": POOLING, "version": FEATURE_VERSION}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


def _atomic_npy(path: Path, shape: tuple[int, ...], dtype: Any):
    """A memory-mapped .npy under a temporary sibling name; `_publish` renames it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape), Path(tmp)


def _publish(array: np.memmap, tmp: Path, path: Path) -> None:
    array.flush()
    del array
    os.replace(tmp, path)


def probe_features(run: Any, images: Any) -> Any:
    """float32 [B, D] probe features of images float[B, 3, H, W] in [0, 1] already on the run's device:
    the run's tokenizer, then `MAGE.features`. The caller picks the grad mode (inference or no_grad)."""
    tokens = run.tokenizer.encode(images).flatten(1)
    return run.model.features(tokens).float()


def extract_features(run: str | Path | Any, data: DataConfig, split: str, batch_size: int = 256,
                     device: str = "cpu", cache_dir: str | Path | None = None,
                     progress: bool = False) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(features float32 [N, D] memory-mapped, labels int64 [N], info) for a run on a data split.

    `run` is a run folder or a `LoadedRun` (pass one to extract several splits with one load).
    """
    import torch
    from tqdm import tqdm

    from mage_bench.data import create_dataset
    from mage_bench.io import atomic_write_json
    from mage_bench.runs import EVAL_DIR, LoadedRun, load_run

    loaded = run if isinstance(run, LoadedRun) else load_run(run, device)
    key = cache_key(loaded.checkpoint_sha256, data, split)
    folder = Path(cache_dir) if cache_dir else loaded.path / EVAL_DIR / "cache"
    folder.mkdir(parents=True, exist_ok=True)
    feats_path, labels_path, meta_path = (folder / f"features-{key}{suffix}" for suffix in (".npy", ".labels.npy",
                                                                                             ".json"))
    info = {"cache_key": key, "checkpoint_sha256": loaded.checkpoint_sha256, "split": split, "layer": LAYER,
            "pooling": POOLING, "transform": TRANSFORM, "data": to_dict(data)}
    if meta_path.exists() and feats_path.exists() and labels_path.exists():
        return np.load(feats_path, mmap_mode="r"), np.load(labels_path), {**info, "cached": True}

    dataset = create_dataset(data, split, train_transform=False)
    n, dim = len(dataset), loaded.config.model.embed_dim
    features, feats_tmp = _atomic_npy(feats_path, (n, dim), np.float32)
    labels = np.empty(n, dtype=np.int64)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=data.num_workers)
    try:
        with torch.inference_mode():
            row = 0
            for images, targets in tqdm(loader, desc=f"features {split}", unit="batch", file=sys.stderr,
                                        disable=not progress):
                batch = probe_features(loaded, images.to(device)).cpu().numpy()
                features[row:row + len(batch)] = batch
                labels[row:row + len(batch)] = np.asarray(targets)
                row += len(batch)
        _publish(features, feats_tmp, feats_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            feats_tmp.unlink()
        raise
    with open(labels_path.with_suffix(".tmp"), "wb") as handle:
        np.save(handle, labels)
    os.replace(labels_path.with_suffix(".tmp"), labels_path)
    atomic_write_json(meta_path, {**info, "n": n, "dim": dim})  # written last: marks a complete cache
    return np.load(feats_path, mmap_mode="r"), labels, {**info, "cached": False}
