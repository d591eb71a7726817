"""Probe features of a MAGE run, extracted once and cached on disk.

The feature is the official linear-probe one (`MAGE.features`: mean of last-block tokens without
the class token, through a parameter-free LayerNorm; nothing masked or dropped), computed in
batches under `torch.inference_mode` and streamed into a memory-mapped .npy, so memory stays flat
in the number of images. The cache key names everything that changes the values: the checkpoint's
sha256, the data set config and the data set's identity (`data.dataset_identity`: its resolved path and
file listing, so a relative `imagefolder:data/x` run from another folder does not reuse these features),
the split, the transform, the layer and the pooling (`extract_views`: any encoder block, pooled by the mean of its
tokens, its class token or both; all asked views in one pass, each cached on its own). Not the batch size: features do not depend on it
beyond float noise. Every file is written through `mage_bench.io` (a temporary name, then a rename), so a
crash never leaves a half cache.

Images per batch: `EvalConfig.feature_batch_size(image_size)` unless given (256 up to 128 px, fewer above:
the VQGAN's fp32 activations of 256 images at 256 px would need ~35 GB).
"""

from __future__ import annotations

import contextlib
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


OFFICIAL_POOLING = "mean"  # with the last block: the official probe feature


def view_names(view: tuple[int, str], depth: int) -> tuple[str, str]:
    """The (layer, pooling) names of a (block index, pooling) view in cache keys and infos. The official feature
    keeps its historical names, so caches made before layer-wise probes stay valid."""
    block, pooling = view
    if block == depth - 1 and pooling == OFFICIAL_POOLING:
        return LAYER, POOLING
    return f"block_{block}", f"{pooling}_ln"


def cache_key(checkpoint_sha256: str, data: DataConfig, split: str, identity: str, layer: str = LAYER,
              pooling: str = POOLING) -> str:
    """The cache name of a split's features of one view; `identity` is `data.dataset_identity` of that split."""
    from mage_bench.data import pixel_settings

    spec = {"checkpoint": checkpoint_sha256, "data": pixel_settings(data), "identity": identity, "split": split,
            "transform": TRANSFORM, "layer": layer, "pooling": pooling, "version": FEATURE_VERSION}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


def probe_features(run: Any, images: Any) -> Any:
    """float32 [B, D] probe features of images float[B, 3, H, W] in [0, 1] already on the run's device:
    the run's tokenizer, then `MAGE.features`. The caller picks the grad mode (inference or no_grad)."""
    tokens = run.tokenizer.encode(images).flatten(1)
    return run.model.features(tokens).float()


def probe_views(run: Any, images: Any, views: list[tuple[int, str]]) -> dict[tuple[int, str], Any]:
    """{(block, pooling): float32 [B, D or 2D]} of images on the run's device: one tokenizer call and one
    encoder pass for every view (`MAGE.layer_features`)."""
    tokens = run.tokenizer.encode(images).flatten(1)
    layers, poolings = sorted({b for b, _ in views}), sorted({p for _, p in views})
    out = run.model.layer_features(tokens, layers, poolings)
    return {view: out[view].float() for view in views}


def extract_features(run: str | Path | Any, data: DataConfig, split: str, batch_size: int | None = None,
                     device: str = "cpu", cache_dir: str | Path | None = None,
                     progress: bool = False, dataset: Any | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(features float32 [N, D] memory-mapped, labels int64 [N], info) of the official probe feature (the last
    block, mean-pooled) for a run on a data split; `extract_views` for other blocks and poolings.

    `run` is a run folder or a `LoadedRun` (pass one to extract several splits with one load); `dataset`
    the split's evaluation data set when the caller made it already (listing ImageNet takes seconds).
    `batch_size`: images per tokenizer + encoder call; None: sized by the image size
    (`EvalConfig.feature_batch_size`). `info["batch_size"]` says which was used (or None on a cache hit).
    """
    from mage_bench.runs import LoadedRun, load_run

    loaded = run if isinstance(run, LoadedRun) else load_run(run, device)
    view = (loaded.config.model.depth - 1, OFFICIAL_POOLING)
    features, labels, infos = extract_views(loaded, data, split, [view], batch_size, device, cache_dir, progress,
                                            dataset)
    return features[view], labels, infos[view]


def extract_views(run: str | Path | Any, data: DataConfig, split: str, views: list[tuple[int, str]],
                  batch_size: int | None = None, device: str = "cpu", cache_dir: str | Path | None = None,
                  progress: bool = False, dataset: Any | None = None) -> tuple[dict, np.ndarray, dict]:
    """({view: features float32 [N, D] memory-mapped}, labels int64 [N], {view: info}) for (block, pooling)
    views of a run on a data split. Each view is cached on its own; the views not cached yet are computed
    together in ONE pass over the images (one tokenizer call and one encoder pass per batch)."""
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
    depth, width = loaded.config.model.depth, loaded.config.model.embed_dim
    folder = Path(cache_dir) if cache_dir else loaded.path / EVAL_DIR / "cache"
    folder.mkdir(parents=True, exist_ok=True)
    paths, infos = {}, {}
    for view in views:
        layer, pooling = view_names(view, depth)
        key = cache_key(loaded.checkpoint_sha256, data, split, identity, layer, pooling)
        paths[view] = tuple(folder / f"features-{key}{suffix}" for suffix in (".npy", ".labels.npy", ".json"))
        infos[view] = {"cache_key": key, "checkpoint_sha256": loaded.checkpoint_sha256, "split": split,
                       "layer": layer, "pooling": pooling, "transform": TRANSFORM, "data": to_dict(data),
                       "dataset_identity": identity}
    todo = [view for view in views if not all(path.exists() for path in paths[view])]
    for view in views:
        if view not in todo:
            infos[view] = {**infos[view], "cached": True, "batch_size": None}
    if todo:
        if batch_size is None:
            batch_size = DEFAULT_EVAL.feature_batch_size(data.image_size)
        n = len(dataset)
        dims = {view: 2 * width if view[1] == "mean+cls" else width for view in todo}
        labels = np.empty(n, dtype=np.int64)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                             num_workers=data.num_workers)
        # Streamed into memory-mapped files published only when complete (memory flat in the image count).
        with contextlib.ExitStack() as stack, torch.inference_mode():
            arrays = {view: stack.enter_context(atomic_memmap(paths[view][0], (n, dims[view]), np.float32))
                      for view in todo}
            row = 0
            for images, targets in tqdm(loader, desc=f"features {split}", unit="batch", file=sys.stderr,
                                        disable=not progress):
                batch = probe_views(loaded, images.to(device), todo)
                for view, values in batch.items():
                    arrays[view][row:row + len(values)] = values.cpu().numpy()
                labels[row:row + len(targets)] = np.asarray(targets)
                row += len(targets)
        for view in todo:
            _, labels_path, meta_path = paths[view]
            atomic_npy_save(labels_path, labels)
            # written last: marks a complete cache
            atomic_write_json(meta_path, {**infos[view], "n": n, "dim": dims[view], "batch_size": batch_size})
            infos[view] = {**infos[view], "cached": False, "batch_size": batch_size}
    features = {view: np.load(paths[view][0], mmap_mode="r") for view in views}
    labels = np.load(paths[views[0]][1])
    return features, labels, infos
