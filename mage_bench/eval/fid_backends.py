"""FID backends: the libraries that compute FID/FD, IS, KID and precision/recall from two image folders.

`BACKENDS` is the registry: torch-fidelity (every metric), clean-fid (FID, KID; its "clean" protocol) and
clean-fid-legacy (the same in clean-fid's legacy PyTorch mode). How the three resize to Inception's 299 px
differs, and so their numbers do on images of another size: torch-fidelity resizes uint8 images inside the
network with TF1-style bilinear interpolation (no half-pixel offset), clean-fid's clean mode with PIL bicubic on
float images, its legacy mode with torch's bilinear interpolate (half-pixel centres). On 299 px images none of
them resizes and they agree (tests/test_generation_metrics.py: `--compare-backends`). `METRICS` declares the
records the `fid` evaluator writes (key, direction, label), `FLAGS` which records each metric flag asks for.

Reference statistics are cached per (reference, resolution, extractor + weights, N): torch-fidelity
keeps them in its own cache under `<cache>/torch-fidelity` (named by that key), clean-fid's features
are kept under `<cache>/clean-fid/<key>.npy`; a second call with the same reference skips its
extraction. The key holds the reference's `ImageSet.identity` (for a data set: its resolved path and
listing digest, `image_sets.reference_spec`), never a path as typed.

Concurrent runs sharing a cache may extract the same reference together; publishing is safe for both:
clean-fid's file is created first-writer-wins (`io.atomic_create`: the loser discards its copy and every
process then computes from the one published file), and torch-fidelity writes its entries to a temporary
file renamed onto the name (its `torch_atomic_save`), which never fails on an existing name and never
exposes a partial file; its entries are a function of the key, so whichever copy stays is the same one.

KID uses subsets of min(1000, N_real, N_fake) images (recorded as `kid_subset_size`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mage_bench.errors import UserError
from mage_bench.eval.image_sets import ImageSet
from mage_bench.metrics import Metric
from mage_bench.registry import Registry

KID_SUBSET_SIZE, KID_SUBSETS = 1000, 100
# The metric flags (`--isc`, `--kid`, `--prc`; FID always) -> the records each one produces.
FLAGS = {"fid": ("fid",), "isc": ("is",), "kid": ("kid",), "prc": ("precision", "recall")}
ISC_SPLITS = 10  # torch-fidelity's default, pinned: IS is the mean (and std) over this many splits of the images
# Records of the `fid` evaluator. FID/IS/KID keep their names only with the standard Inception weights.
METRICS = (Metric("fid", False, "FID", nonstandard_label="FD"), Metric("is", True, "IS", nonstandard_label="IS"),
           Metric("kid", False, "KID", nonstandard_label="KD"),
           Metric("precision", True, "precision", nonstandard_label="precision"),
           Metric("recall", True, "recall", nonstandard_label="recall"),
           # Evaluation profiles only (`profile_eval`): Naeem et al.'s density/coverage and CMMD
           Metric("density", True, "density", nonstandard_label="density"),
           Metric("coverage", True, "coverage", nonstandard_label="coverage"),
           Metric("cmmd", False, "CMMD", nonstandard_label="MMD",
                  standard_extractors=frozenset({"clip-vit-l-14-336px"})))
SPREADS = {"is": "is_std", "kid": "kid_std"}  # a record's `std`: the backend's key of its spread


# --------------------------------------------------------------------------------------------
# Backends


@dataclass(frozen=True)
class Request:
    fake: ImageSet
    real: ImageSet
    metrics: frozenset[str]  # metric flags: keys of FLAGS
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
    metrics: frozenset[str]  # which metric flags (keys of FLAGS) it can compute


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
        kid_subset_size=request.kid_subset_size, kid_subsets=KID_SUBSETS, isc_splits=ISC_SPLITS,
        rng_seed=request.seed,
        cache_root=str(request.cache_dir / "torch-fidelity"), cache=True,
        save_cpu_ram=not request.device.startswith("cuda"),  # no DataLoader worker processes on CPU
        verbose=request.progress)
    names = {"frechet_inception_distance": "fid", "inception_score_mean": "is", "inception_score_std": "is_std",
             "kernel_inception_distance_mean": "kid", "kernel_inception_distance_std": "kid_std",
             "precision": "precision", "recall": "recall", "f_score": "f_score"}
    return {names[k]: float(v) for k, v in metrics.items() if k in names}


def _clean_fid(request: Request, mode: str = "clean") -> dict[str, float]:
    """clean-fid's protocol `mode`: "clean" (PIL bicubic resize of float images to 299 px, no quantisation) or
    "legacy_pytorch" (torch's bilinear `interpolate`, align_corners=False, as pytorch-fid); an extractor with its
    own resize (digits-cnn) uses that in either mode."""
    import torch
    from cleanfid import fid as cleanfid

    from mage_bench.io import atomic_create

    model = request.extractor.cleanfid_model(request.weights, request.device)
    resize = request.extractor.cleanfid_resize()
    device = torch.device(request.device)

    def features(files: tuple[Path, ...], label: str) -> np.ndarray:
        return cleanfid.get_files_features([str(f) for f in files], model=model, num_workers=0, batch_size=64,
                                           device=device, mode=mode, custom_fn_resize=resize,
                                           description=label, verbose=request.progress)

    # The clean mode keeps the name it always had; another mode's features differ, so their file does too.
    prefix = "" if mode == "clean" or resize is not None else f"{mode}-"
    reference = request.cache_dir / "clean-fid" / f"{prefix}{request.reference_key()}.npy"
    if not reference.is_file():
        real = features(request.real.files, "clean-fid real ")
        with atomic_create(reference) as handle:  # another run publishing first is fine: theirs is kept
            np.save(handle, real)
    real = np.load(reference)  # the published copy, so runs racing on it all compute from the same features
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


BACKENDS.register("torch-fidelity")(Backend(_torch_fidelity, frozenset(FLAGS)))
BACKENDS.register("clean-fid")(Backend(_clean_fid, frozenset({"fid", "kid"})))
BACKENDS.register("clean-fid-legacy")(Backend(lambda request: _clean_fid(request, "legacy_pytorch"),
                                              frozenset({"fid", "kid"})))


def check_backend(name: str, metrics: tuple[str, ...] | frozenset[str]) -> Backend:
    """The backend, if it can compute `metrics` (checked before any image is read)."""
    backend = BACKENDS.get(name)
    unsupported = set(metrics) - backend.metrics
    if unsupported:
        raise UserError(f"{name} computes {', '.join(sorted(backend.metrics))} only, not "
                        f"{', '.join(sorted(unsupported))}; use --backend torch-fidelity")
    return backend


def compute_metrics(request: Request, backend: str) -> dict[str, float]:
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
    if "isc" in request.metrics and request.fake.count < ISC_SPLITS:  # else empty splits give NaN, not an error
        raise UserError(f"IS needs at least {ISC_SPLITS} generated images (it averages over {ISC_SPLITS} splits); "
                        f"got {request.fake.count}: raise num_samples")
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
