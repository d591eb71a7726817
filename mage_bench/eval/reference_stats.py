"""`mage-bench eval stats`: a reference's statistics file, written from the one cached feature pass.

The file holds `mu`, `sigma` (float64, unbiased covariance), `activations` (the reference's features, float32
[N, D]: what precision/recall/density/coverage need, since a file of moments cannot give them: LTH14/mar#91) and
their provenance: `extractor`, `weights_sha256`, `count`. `eval fid --real FILE.npz` (and profiles with
reference: statistics) read it back; `statistics.reference_activations` refuses activations of another network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mage_bench.errors import UserError
from mage_bench.eval.statistics import STATISTICS_SUFFIX


def write_statistics(real: str, out: str | Path, extractor: str | None = None, weights: str | None = None,
                     device: str = "auto", image_size: int | None = None, split: str | None = None,
                     cache_dir: str | Path | None = None, progress: bool = False) -> dict[str, Any]:
    """`eval stats`: a reference's statistics file: `mu`, `sigma` (float64, unbiased), `activations` (the
    features, float32 [N, D]: what precision/recall/density/coverage need), and `extractor`,
    `weights_sha256`, `count` (so a reader can refuse features of another network). The features come from
    the one cached feature pass (`feature_sets`). Returns a summary with the file's sha256."""
    import dataclasses

    from mage_bench.config import DataConfig
    from mage_bench.data import DATASETS, DatasetSpec
    from mage_bench.eval.extractors import FID_EXTRACTORS
    from mage_bench.eval.feature_sets import ImageSource, image_features
    from mage_bench.eval.fid import feature_statistics
    from mage_bench.eval.generation import default_extractor
    from mage_bench.eval.image_sets import DEFAULT_CACHE, dataset_reference, scan_folder
    from mage_bench.io import atomic_open, sha256_file
    from mage_bench.runs import resolve_device

    out = Path(out)
    if out.suffix != STATISTICS_SUFFIX:
        raise UserError(f"--out {out} must end in {STATISTICS_SUFFIX}")
    cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    network = FID_EXTRACTORS.get(extractor or default_extractor(real))
    if Path(real).is_dir():
        if image_size is not None or split is not None:
            raise UserError("--image-size and --real-split apply to a --real data set, not a folder")
        images = scan_folder(real)
    elif DatasetSpec.parse(real).name in DATASETS:
        data = dataclasses.replace(DataConfig(), name=real, **({"image_size": image_size} if image_size else {}))
        images = dataset_reference(data, split or "train", cache, progress)
    else:
        raise UserError(f"--real {real!r} is neither a folder nor a data set ({', '.join(DATASETS.names())})")
    weights_file = network.resolve_weights(weights, progress, allow_download=True)
    digest = sha256_file(weights_file)
    features = image_features(ImageSource.of_images(images), network, weights_file, digest, resolve_device(device),
                              cache, progress).features
    mu, sigma = feature_statistics(np.asarray(features))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out, "wb") as handle:
        np.savez(handle, mu=mu, sigma=sigma, activations=np.asarray(features, dtype=np.float32),
                 extractor=np.array(network.name), weights_sha256=np.array(digest), count=np.array(images.count))
    return {"out": str(out), "sha256": sha256_file(out), "count": images.count, "feature_dim": int(mu.shape[0]),
            "extractor": network.name, "weights_sha256": digest, "images": images.description}

