"""One feature pass per (image set, extractor), cached on disk and memory-mapped.

The evaluation profiles compute every metric (FD, KD, IS, precision/recall, density/coverage, CMMD) from the
features of one pass: torch-fidelity's image reader (`ImagesPathDataset`: PIL, RGB, uint8) and its extractor
network with its own in-network resize, exactly what `torch_fidelity.calculate_metrics` would compute, so the
FD here is torch-fidelity's FID of the same images. A classifier extractor also gives its logits (IS) in the
same pass.

Cache: `<cache>/features/<key>/` holding `features.npy` [N, D] float32, `logits.npy` (classifiers) and
`meta.json`, published as one folder (first writer wins: two runs racing on a reference both read the copy that
was published). The key is the image set's identity (a folder's resolved path and listing digest, or a data
set's pixel settings and listing: `image_sets`), its count and size, the extractor, the sha256 of its weights and
the torch-fidelity version. A second profile with the same extractor, or a second evaluation of the same images,
reads the arrays back (memory-mapped) instead of extracting them again; `FeatureSet.extracted` says which.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mage_bench.errors import UserError

FEATURES_DIR = "features"
FEATURES_FILE, LOGITS_FILE, META_FILE = "features.npy", "logits.npy", "meta.json"
BATCH_SIZE = 64  # images per extractor batch (torch-fidelity's default)
# Part of every cache key: bump it when mage-bench's own extractor code (digits-cnn, the DINOv2 wrapper) or the
# way features are read changes what a cached array holds
FEATURES_VERSION = 1


@dataclass(frozen=True)
class ImageSource:
    """Images to extract features from: a list of files, or a uint8 array [N, H, W, 3] (a reference batch)."""

    identity: str  # what makes two sources the same images
    count: int
    description: str
    files: tuple[Path, ...] = ()
    array: Any = None  # np.ndarray uint8 [N, H, W, 3]
    # Images made on the fly (a run's decoder: no PNG round trip): indices -> uint8 [B, 3, H, W], exactly the
    # pixels the PNG files would hold
    render: Any = None

    @classmethod
    def of_images(cls, images: Any) -> ImageSource:
        """From an `image_sets.ImageSet`."""
        return cls(identity=f"{images.identity}:{images.size[0]}x{images.size[1]}", count=images.count,
                   description=images.description, files=images.files)

    def dataset(self) -> Any:
        """A torch Dataset of uint8 [3, H, W] tensors, as torch-fidelity reads images."""
        if self.array is None:
            from torch_fidelity.datasets import ImagesPathDataset

            return ImagesPathDataset([str(f) for f in self.files])
        return _array_images(self.array)


def _array_images(array: np.ndarray) -> Any:
    """uint8 HWC images held in an array as a torch Dataset of CHW uint8 tensors (what torch-fidelity reads)."""
    import torch

    class ArrayImages(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(array)

        def __getitem__(self, index: int) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array[index].transpose(2, 0, 1)))

    return ArrayImages()


@dataclass(frozen=True)
class FeatureSet:
    features: np.ndarray  # float32 [N, D], memory-mapped
    logits: np.ndarray | None  # float32 [N, C] for classifier extractors (IS), else None
    folder: Path
    extracted: bool  # True when this call ran the extractor, False when the cache held the features
    seconds: float  # extraction (or loading) time


def feature_layers(extractor: Any) -> tuple[str, str | None]:
    """(the torch-fidelity feature layer for FD/KD/PR, the logits layer for IS or None) of an extractor."""
    import torch_fidelity.utils as tf_utils

    from mage_bench.eval.extractors import register_with_torch_fidelity

    register_with_torch_fidelity()
    name = extractor.torch_fidelity_name
    features = tf_utils.resolve_feature_layer_for_metric("fid", feature_extractor=name)
    logits = tf_utils.resolve_feature_layer_for_metric("isc", feature_extractor=name) if extractor.classifier else None
    return features, logits


def cache_key(source: ImageSource, extractor: Any, weights_sha256: str) -> str:
    from importlib import metadata

    spec = {"images": source.identity, "count": source.count, "extractor": extractor.name,
            "weights": weights_sha256, "torch_fidelity": metadata.version("torch-fidelity"),
            "version": FEATURES_VERSION}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


def image_features(source: ImageSource, extractor: Any, weights: Path, weights_sha256: str, device: str,
                   cache_dir: Path, progress: bool = False) -> FeatureSet:
    """The features (and logits) of `source` through `extractor`, from the cache or extracted once into it."""
    from mage_bench.io import atomic_folder, atomic_write_json

    folder = Path(cache_dir) / FEATURES_DIR / cache_key(source, extractor, weights_sha256)
    start = time.perf_counter()
    extracted = False
    if not (folder / META_FILE).is_file():
        features_layer, logits_layer = feature_layers(extractor)
        arrays = _extract(source, extractor, weights, device, [features_layer] + ([logits_layer] if logits_layer
                                                                                   else []), progress)
        with atomic_folder(folder) as staging:  # another process publishing first is fine: theirs is kept
            np.save(staging / FEATURES_FILE, arrays[features_layer])
            if logits_layer:
                np.save(staging / LOGITS_FILE, arrays[logits_layer])
            atomic_write_json(staging / META_FILE, {
                "images": source.identity, "description": source.description, "count": source.count,
                "extractor": extractor.name, "weights_sha256": weights_sha256, "layers":
                    [features_layer] + ([logits_layer] if logits_layer else []),
                "seconds": round(time.perf_counter() - start, 3)})
        extracted = True
    features = np.load(folder / FEATURES_FILE, mmap_mode="r")
    logits = np.load(folder / LOGITS_FILE, mmap_mode="r") if (folder / LOGITS_FILE).is_file() else None
    if features.shape[0] != source.count:
        raise UserError(f"cached features {folder} hold {features.shape[0]} rows for {source.count} images; "
                        "delete that folder and rerun")
    return FeatureSet(features, logits, folder, extracted, time.perf_counter() - start)


def _rendered_features(source: ImageSource, network: Any, cuda: bool, progress: bool) -> dict[str, Any]:
    """torch-fidelity's batching loop (`get_featuresdict_from_dataset`) on images rendered batch by batch: the
    same batches in the same order as the PNG path, each handed from the decoder to the extractor in memory."""
    import torch
    from tqdm import tqdm

    parts: dict[str, list[Any]] = {}
    with torch.no_grad(), tqdm(total=source.count, desc="generate + features", unit="img", file=sys.stderr,
                               disable=not progress) as bar:
        for start in range(0, source.count, BATCH_SIZE):
            batch = source.render(list(range(start, min(start + BATCH_SIZE, source.count))))
            batch = batch.cuda(non_blocking=True) if cuda else batch.cpu()
            named = network.convert_features_tuple_to_dict(network(batch))
            for name, value in named.items():
                parts.setdefault(name, []).append(value.cpu())
            bar.update(len(batch))
    return {name: torch.cat(values) for name, values in parts.items()}


def _extract(source: ImageSource, extractor: Any, weights: Path, device: str, layers: list[str],
             progress: bool) -> dict[str, np.ndarray]:
    """float32 arrays per layer through torch-fidelity's network and batching (as its metrics read them)."""
    import contextlib

    import torch_fidelity.utils as tf_utils

    cuda = device.startswith("cuda")
    with contextlib.redirect_stdout(sys.stderr):  # torch-fidelity prints progress on stdout; --json owns it
        network = tf_utils.create_feature_extractor(extractor.torch_fidelity_name, layers, cuda=cuda,
                                                    feature_extractor_weights_path=str(weights), verbose=progress)
        if source.render is not None:
            out = _rendered_features(source, network, cuda, progress)
        else:
            out = tf_utils.get_featuresdict_from_dataset(source.dataset(), network, batch_size=BATCH_SIZE, cuda=cuda,
                                                         save_cpu_ram=not cuda, verbose=progress)
    arrays = {layer: out[layer].numpy().astype(np.float32, copy=False) for layer in layers}
    for layer, array in arrays.items():
        if not np.isfinite(array).all():
            raise UserError(f"{extractor.name} features ({layer}) of {source.description} hold NaN or inf: check "
                            "the images and the extractor weights")
    return arrays
