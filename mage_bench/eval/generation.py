"""Generation metrics (FID/FD, IS, KID, precision/recall) through torch-fidelity or clean-fid.

Both sides are folders of images by the time a backend sees them:
- `--fake`: a folder, or a run folder (then N images are generated with the run's decoding settings
  into RUN/samples/, reusing any already there);
- `--real`: a folder, or a data set (its split is written once as lossless PNGs into the cache, like
  the paper's PNG reference set; the images are the data pipeline's eval view: resize + centre crop).

Folders are checked first: no images, unreadable files or mixed sizes are one-line errors. Grayscale,
palette and RGBA images are converted to RGB (alpha dropped), as both libraries do on load. In a folder
written by `mage-bench generate` (it holds generation.json) the preview grid.png is not a sample.

Reference statistics are cached per (reference, resolution, extractor + weights, N): torch-fidelity
keeps them in its own cache under `<cache>/torch-fidelity` (named by that key), clean-fid's features
are kept under `<cache>/clean-fid/<key>.npy`; a second call with the same reference skips its
extraction. KID uses subsets of min(1000, N_real, N_fake) images (recorded as `kid_subset_size`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mage_bench.errors import UserError
from mage_bench.io import slug
from mage_bench.registry import Registry

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")  # torch-fidelity's samples_find_ext default
DEFAULT_CACHE = Path(os.environ.get("MAGE_BENCH_CACHE", Path.home() / ".cache" / "mage-bench"))
KID_SUBSET_SIZE, KID_SUBSETS = 1000, 100
METRICS = ("fid", "isc", "kid", "prc")
GENERATION_MANIFEST, GENERATION_GRID = "generation.json", "grid.png"  # as written by mage_bench.sampling


@dataclass(frozen=True)
class ImageSet:
    folder: Path
    files: tuple[Path, ...]
    count: int
    size: tuple[int, int]  # (width, height)
    identity: str  # what makes its statistics the same: data set + split + size, or folder contents
    description: str


def list_images(folder: Path) -> list[Path]:
    """The images torch-fidelity and clean-fid would read: png/jpg/jpeg directly in `folder`, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)


def scan_folder(folder: str | Path, description: str | None = None) -> ImageSet:
    """Check a folder of images: exists, not empty, every image readable and of one size."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of images")
    files = list_images(folder)
    if (folder / GENERATION_MANIFEST).is_file():  # `mage-bench generate` output: its preview grid is no sample
        files = [f for f in files if f.name != GENERATION_GRID]
    if not files:
        raise UserError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}); generate or copy images there")
    sizes: dict[tuple[int, int], Path] = {}
    fingerprint = hashlib.sha256()
    for path in files:
        try:
            with Image.open(path) as image:
                sizes.setdefault(image.size, path)
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"{path} is not a readable image ({exc}); remove or replace it") from None
        stat = path.stat()
        fingerprint.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    if len(sizes) > 1:
        (a, pa), (b, pb) = list(sizes.items())[:2]
        raise UserError(f"{folder} mixes image sizes ({a[0]}x{a[1]} in {pa.name}, {b[0]}x{b[1]} in {pb.name}); "
                        "resize them to one size first")
    identity = f"folder:{folder.resolve()}:{len(files)}:{fingerprint.hexdigest()[:16]}"
    return ImageSet(folder, tuple(files), len(files), next(iter(sizes)), identity, description or str(folder))


def dataset_reference(data: Any, split: str, cache_dir: Path, progress: bool = False) -> ImageSet:
    """A data set split as PNG files under the cache (written once, atomically as a folder)."""
    from PIL import Image

    from mage_bench.config import to_dict
    from mage_bench.data import create_dataset

    spec = json.dumps({"data": to_dict(data), "split": split, "view": "eval_resize_center_crop"}, sort_keys=True)
    key = hashlib.sha256(spec.encode()).hexdigest()[:16]
    folder = cache_dir / "reference-images" / f"{slug(data.name, empty='data')}-{split}-{data.image_size}px-{key}"
    if not folder.is_dir():
        dataset = create_dataset(data, split, train_transform=False)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            _write_pngs(dataset, staging, progress, f"reference {data.name} {split}")
            os.replace(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    files = list_images(folder)
    with Image.open(files[0]) as image:
        size = image.size
    return ImageSet(folder, tuple(files), len(files), size, f"dataset:{spec}",
                    f"{data.name} {split} ({len(files)} images)")


def _write_pngs(dataset: Any, folder: Path, progress: bool, desc: str) -> None:
    import torch
    from PIL import Image
    from tqdm import tqdm

    loader = torch.utils.data.DataLoader(dataset, batch_size=256, shuffle=False)
    index = 0
    for images, _ in tqdm(loader, desc=desc, unit="batch", file=sys.stderr, disable=not progress):
        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for array in pixels:
            Image.fromarray(array).save(folder / f"{index:06d}.png")
            index += 1


def resolve_fake(fake: str, num: int | None) -> ImageSet:
    """`--fake` as a folder of images (runs are handled by the caller, which generates into RUN/samples)."""
    images = scan_folder(fake)
    if num is not None and num != images.count:
        raise UserError(f"--num {num} but {fake} holds {images.count} images; --num applies to runs only")
    return images


# --------------------------------------------------------------------------------------------
# Backends


@dataclass(frozen=True)
class Request:
    fake: ImageSet
    real: ImageSet
    metrics: frozenset[str]  # subset of METRICS
    extractor: Any  # extractors.FidExtractor
    weights: Path
    device: str
    cache_dir: Path
    seed: int
    progress: bool

    def reference_key(self) -> str:
        from mage_bench.io import sha256_file

        spec = {"real": self.real.identity, "size": self.real.size, "n": self.real.count,
                "extractor": self.extractor.name, "weights": sha256_file(self.weights)}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]

    @property
    def kid_subset_size(self) -> int:
        return min(KID_SUBSET_SIZE, self.real.count, self.fake.count)


@dataclass(frozen=True)
class Backend:
    compute: Callable[[Request], dict[str, float]]
    metrics: frozenset[str]  # which of METRICS it can compute


BACKENDS: Registry[Backend] = Registry("FID backend")


def _torch_fidelity(request: Request) -> dict[str, float]:
    import torch_fidelity
    from torch_fidelity.datasets import ImagesPathDataset

    from mage_bench.eval.extractors import register_with_torch_fidelity

    register_with_torch_fidelity()
    def images(files: tuple[Path, ...]):  # torch-fidelity's own folder reader, on exactly these files
        return ImagesPathDataset([str(f) for f in files])

    metrics = torch_fidelity.calculate_metrics(
        input1=images(request.fake.files), input2=images(request.real.files),
        input2_cache_name=f"mage-bench-ref-{request.reference_key()}",
        cuda=request.device.startswith("cuda"),  # torch-fidelity defaults to cuda=True, which fails on CPU
        isc="isc" in request.metrics, fid="fid" in request.metrics, kid="kid" in request.metrics,
        prc="prc" in request.metrics,
        feature_extractor=request.extractor.torch_fidelity_name,
        feature_extractor_weights_path=str(request.weights),
        kid_subset_size=request.kid_subset_size, kid_subsets=KID_SUBSETS, rng_seed=request.seed,
        cache_root=str(request.cache_dir / "torch-fidelity"), cache=True,
        save_cpu_ram=not request.device.startswith("cuda"),  # no DataLoader worker processes on CPU
        verbose=request.progress)
    names = {"frechet_inception_distance": "fid", "inception_score_mean": "is", "inception_score_std": "is_std",
             "kernel_inception_distance_mean": "kid", "kernel_inception_distance_std": "kid_std",
             "precision": "precision", "recall": "recall", "f_score": "f_score"}
    return {names[k]: float(v) for k, v in metrics.items() if k in names}


def _clean_fid(request: Request) -> dict[str, float]:
    import torch
    from cleanfid import fid as cleanfid

    model = request.extractor.cleanfid_model(request.weights, request.device)
    resize = request.extractor.cleanfid_resize()
    device = torch.device(request.device)

    def features(files: tuple[Path, ...], label: str) -> np.ndarray:
        return cleanfid.get_files_features([str(f) for f in files], model=model, num_workers=0, batch_size=64,
                                           device=device, mode="clean", custom_fn_resize=resize,
                                           description=label, verbose=request.progress)

    reference = request.cache_dir / "clean-fid" / f"{request.reference_key()}.npy"
    if reference.is_file():
        real = np.load(reference)
    else:
        real = features(request.real.files, "clean-fid real ")
        reference.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=reference.parent, suffix=".tmp", delete=False) as handle:
            np.save(handle, real)
        os.replace(handle.name, reference)
    fake = features(request.fake.files, "clean-fid fake ")
    out = {}
    with contextlib.redirect_stdout(sys.stderr):  # clean-fid prints; --json owns stdout
        if "fid" in request.metrics:
            out["fid"] = float(cleanfid.fid_from_feats(fake, real))
        if "kid" in request.metrics:
            state = np.random.get_state()  # clean-fid draws KID subsets from the global NumPy RNG
            np.random.seed(request.seed)
            try:
                out["kid"] = float(cleanfid.kernel_distance(fake, real, num_subsets=KID_SUBSETS,
                                                            max_subset_size=request.kid_subset_size))
            finally:
                np.random.set_state(state)
    return out


BACKENDS.register("torch-fidelity")(Backend(_torch_fidelity, frozenset(METRICS)))
BACKENDS.register("clean-fid")(Backend(_clean_fid, frozenset({"fid", "kid"})))


def check_backend(name: str, metrics: tuple[str, ...] | frozenset[str]) -> Backend:
    """The backend, if it can compute `metrics` (checked before any image is read)."""
    backend = BACKENDS.get(name)
    unsupported = set(metrics) - backend.metrics
    if unsupported:
        raise UserError(f"{name} computes {', '.join(sorted(backend.metrics))} only, not "
                        f"{', '.join(sorted(unsupported))}; use --backend torch-fidelity")
    return backend


def generation_metrics(request: Request, backend: str) -> dict[str, float]:
    """Metric name -> value (fid, is, is_std, kid, kid_std, precision, recall, f_score as computed)."""
    run = check_backend(backend, request.metrics).compute
    if not request.metrics:
        raise UserError("no generation metric asked for")
    if "kid" in request.metrics and request.kid_subset_size < 2:
        raise UserError(f"KID needs at least 2 images on each side (real {request.real.count}, "
                        f"fake {request.fake.count})")
    if "fid" in request.metrics and min(request.real.count, request.fake.count) < 2:
        raise UserError(f"FID needs at least 2 images on each side (real {request.real.count}, "
                        f"fake {request.fake.count})")
    hint = "the features contain NaN or inf (check the images and the extractor weights)"
    try:
        with contextlib.redirect_stdout(sys.stderr):  # both libraries print progress on stdout
            values = run(request)
    except (ValueError, np.linalg.LinAlgError) as exc:
        # The libraries feed features straight into linear algebra, which refuses NaN/inf.
        if any(word in str(exc).lower() for word in ("nan", "inf")):
            raise UserError(f"{backend} failed: {hint}") from None
        raise
    bad = [k for k, v in values.items() if not np.isfinite(v)]
    if bad:
        raise UserError(f"{', '.join(bad)} came out non-finite: {hint}")
    return values
