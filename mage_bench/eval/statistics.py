"""Published reference statistics as FID's real side: `eval fid --real FILE.npz`.

The ADM suite's reference batches (e.g. VIRTUAL_imagenet256_labeled.npz) and clean-fid's statistics files hold
the reference's Inception pool3 mean `mu` [D] and covariance `sigma` [D, D]; stock torch-fidelity cannot take
them (LTH14/mar#93). Here the generated images go through torch-fidelity's own feature pipeline (its
`ImagesPathDataset` reader, the extractor with its in-network resize, the FID feature layer), their mean and
unbiased covariance are fitted (`fid.feature_statistics`) and the Fréchet distance is taken against the file's
(`fid.frechet_from_statistics`). Only FID: a file of moments cannot give IS, KID or precision/recall (those
need the reference's features or images). The file's sha256 goes into every record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mage_bench.errors import UserError

STATISTICS_SUFFIX = ".npz"  # ADM batches, clean-fid statistics, `eval stats`
TORCH_FIDELITY_SUFFIX = ".pt"  # torch-fidelity's cached statistics: {"mu", "sigma"} NumPy arrays through torch.save
STATISTICS_SUFFIXES = (STATISTICS_SUFFIX, TORCH_FIDELITY_SUFFIX)


def is_statistics_file(real: str | Path) -> bool:
    return Path(real).suffix in STATISTICS_SUFFIXES and Path(real).is_file()


def _torch_fidelity_statistics(path: Path) -> tuple[Any, Any]:
    """mu, sigma of a torch-fidelity statistics file (`<input>-<extractor>-stat-fid-<layer>.pt` in its cache),
    loaded with weights_only=True and only NumPy's array types allowed: the file is data, never code."""
    import torch

    allowed = [np.ndarray, np.dtype, np._core.multiarray._reconstruct, type(np.dtype(np.float32)),
               type(np.dtype(np.float64))]
    try:
        with torch.serialization.safe_globals(allowed):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torch pickle of anything else: one line, not a traceback
        raise UserError(f"cannot read {path} as torch-fidelity statistics ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not {"mu", "sigma"} <= set(data):
        raise UserError(f"{path} is not torch-fidelity statistics (a dict of `mu` and `sigma`)")
    return np.asarray(data["mu"]), np.asarray(data["sigma"])


def load_statistics(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) in float64 from an .npz holding `mu` and `sigma`, or a torch-fidelity statistics
    .pt; a `UserError` naming what is wrong otherwise (pickled objects are refused: the file is data, never
    code)."""
    if Path(path).suffix == TORCH_FIDELITY_SUFFIX:
        mu, sigma = (np.asarray(a, dtype=np.float64) for a in _torch_fidelity_statistics(Path(path)))
        return _checked(path, mu, sigma)
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            if not {"mu", "sigma"} <= keys:
                raise UserError(f"{path} holds {', '.join(sorted(keys)) or 'nothing'}, not `mu` and `sigma`: give a "
                                "statistics file (ADM reference batch, clean-fid statistics) or a folder of images")
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path} as an .npz statistics file: {exc}") from None
    return _checked(path, mu, sigma)


def _checked(path: str | Path, mu: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise UserError(f"{path}: `mu` must be [D] and `sigma` [D, D], got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"{path}: `mu` or `sigma` holds NaN or inf")
    return mu, sigma


def fake_features(files: tuple[Path, ...], extractor: Any, weights: Path, device: str, progress: bool) -> np.ndarray:
    """float64 [N, D]: the FID features of `files` through torch-fidelity's reader and extractor (as its FID)."""
    import torch_fidelity.utils as tf_utils
    from torch_fidelity.datasets import ImagesPathDataset

    from mage_bench.eval.extractors import register_with_torch_fidelity

    register_with_torch_fidelity()
    cuda = device.startswith("cuda")
    name = extractor.torch_fidelity_name
    layer = tf_utils.resolve_feature_layer_for_metric("fid", feature_extractor=name)
    network = tf_utils.create_feature_extractor(name, [layer], cuda=cuda, feature_extractor_weights_path=str(weights),
                                                verbose=progress)
    features = tf_utils.get_featuresdict_from_dataset(ImagesPathDataset([str(f) for f in files]), network,
                                                      batch_size=64, cuda=cuda, save_cpu_ram=not cuda,
                                                      verbose=progress)
    return features[layer].numpy().astype(np.float64)


def fid_against_statistics(fake_files: tuple[Path, ...], statistics: Path, reference: tuple[np.ndarray, np.ndarray],
                           extractor: Any, weights: Path, device: str, progress: bool = False) -> dict[str, Any]:
    """{"fid", "reference_sha256", "feature_dim"}: FID of the images against `reference`, the (mu, sigma) that
    `load_statistics` read from the file `statistics`."""
    from mage_bench.eval.fid import feature_statistics, frechet_from_statistics
    from mage_bench.io import sha256_file

    mu_ref, sigma_ref = reference
    mu, sigma = feature_statistics(fake_features(fake_files, extractor, weights, device, progress))
    if mu.shape != mu_ref.shape:
        raise UserError(f"{statistics} holds {mu_ref.shape[0]}-d statistics, but {extractor.name} gives "
                        f"{mu.shape[0]}-d features: use the extractor the file was made with (--extractor)")
    return {"fid": frechet_from_statistics(mu, sigma, mu_ref, sigma_ref), "reference_sha256": sha256_file(statistics),
            "feature_dim": int(mu.shape[0])}


def reference_activations(path: str | Path, extractor: str, weights_sha256: str) -> np.ndarray | None:
    """The `activations` a statistics file written by `eval stats` holds, if any, after checking they come
    from the same extractor and weights (a file without that provenance, or of another network, is refused)."""
    with np.load(path, allow_pickle=False) as data:
        if "activations" not in data.files:
            return None
        made_with = (str(data["extractor"]) if "extractor" in data.files else None,
                     str(data["weights_sha256"]) if "weights_sha256" in data.files else None)
        activations = data["activations"]
    if made_with != (extractor, weights_sha256):
        raise UserError(f"{path} holds activations of {made_with[0] or 'an unnamed extractor'} (weights "
                        f"{(made_with[1] or 'unknown')[:12]}), not of {extractor} ({weights_sha256[:12]}); write it "
                        f"again with `mage-bench eval stats --extractor {extractor}`")
    return activations
