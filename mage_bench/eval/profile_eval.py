"""A generation evaluation under an evaluation profile (`eval fid|all --profile NAME`, a sweep's `eval.profile`).

Checks first, cheapest first, before any image is generated: the profile, its reference against `--real`
(a data set, a folder of PNGs of the pinned count and size, or a statistics file of the pinned sha256), the
extractor's weights against the pinned sha256. Then the generated side (a folder, or a run's images decoded
with the profile's steps and temperature into RUN/samples, or RUN/samples-<steps>-<temperature> when those
differ from the run's own), one feature pass per side (`feature_sets`, cached), every metric of the profile
(`profile_metrics`) and the records: evaluator `fid`, each carrying `profile`, `profile_hash` and
`profile_version` and everything needed to reproduce the number. A run's records go to
RUN/eval/fid-<profile>.json, beside (never over) the records of other profiles.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mage_bench.errors import UserError
from mage_bench.eval.profiles import EvalProfile, load_profile

EVALUATOR = "fid"  # profile records are generation records: the report keeps them apart by `profile`
BACKEND = "torch-fidelity features"  # torch-fidelity's reader and extractor; the metrics computed from the features


def records_name(profile: EvalProfile) -> str:
    """RUN/eval/<this>.json: one records file per profile."""
    from mage_bench.io import slug

    return f"{EVALUATOR}-{slug(profile.name, empty='profile')}"


@dataclass(frozen=True)
class Reference:
    """The real side as resolved: images (an ImageSet), and/or moments from a statistics file."""

    images: Any | None  # image_sets.ImageSet
    dataset: str  # the records' `dataset`
    split: str  # the records' `split`
    statistics: tuple[Any, Any] | None = None  # (mu, sigma)
    array: Any = None  # a statistics file's reference images (uint8 [N, H, W, 3]) when it holds them
    activations: Any = None  # or its reference features (`eval stats` files), of the profile's extractor
    fields: dict[str, Any] | None = None  # what the records say about it

    @property
    def count(self) -> int | None:
        if self.images is not None:
            return self.images.count
        for held in (self.array, self.activations):
            if held is not None:
                return len(held)
        return None


def _check_real_argument(profile: EvalProfile, real: str | None, fake_is_run: bool) -> None:
    """`--real` as the profile's reference kind expects it (nothing is read)."""
    from mage_bench.eval.statistics import is_statistics_file

    kind = profile.reference
    if kind == "folder" and (not real or not Path(real).is_dir()):
        raise UserError(f"profile {profile.name} compares against a folder of reference PNGs"
                        f"{f' ({profile.reference_preparation})' if profile.reference_preparation else ''}: "
                        f"give it with --real DIR" + (f" ({real} is not a folder)" if real else ""))
    if kind == "statistics" and (not real or not is_statistics_file(real)):
        raise UserError(f"profile {profile.name} compares against a statistics file ({profile.reference_preparation}"
                        f"): give it with --real FILE.npz|FILE.pt" + (f" ({real} is not one)" if real else ""))
    if kind == "dataset":
        if profile.reference_data and real and real != profile.reference_data:
            raise UserError(f"profile {profile.name} pins the reference data set {profile.reference_data}; drop "
                            f"--real {real} or use another profile")
        if not profile.reference_data and not real and not fake_is_run:
            raise UserError(f"profile {profile.name} compares against the run's data set: give --real DATASET when "
                            "--fake is a folder")


def check_weights(profile: EvalProfile, weights_path: str | None, allow_download: bool,
                  progress: bool = False) -> tuple[Path, str]:
    """(the extractor's weights file, its sha256), refused when it is not the pinned file."""
    from mage_bench.eval.extractors import FID_EXTRACTORS
    from mage_bench.io import sha256_file

    weights = FID_EXTRACTORS.get(profile.extractor).resolve_weights(weights_path, progress,
                                                                    allow_download=allow_download)
    digest = sha256_file(weights)
    if profile.weights_sha256 and not digest.startswith(profile.weights_sha256):
        raise UserError(f"{weights} (sha256 {digest[:12]}...) is not the {profile.extractor} weights profile "
                        f"{profile.name} pins ({profile.weights_sha256}...); use the pinned file or a profile "
                        "of your own (`base: " + profile.name + "` with weights_sha256 changed)")
    return weights, digest


def check_profile_inputs(profile: EvalProfile | str, real: str | None, weights_path: str | None = None,
                         fake_is_run: bool = True, progress: bool = False,
                         allow_download: bool = False) -> tuple[EvalProfile, Path, str]:
    """The checks that read no image and load no run, so a sweep can make them before any training:
    (the profile, its extractor's weights file, their sha256)."""
    profile = load_profile(profile) if isinstance(profile, str) else profile
    _check_real_argument(profile, real, fake_is_run)
    weights, digest = check_weights(profile, weights_path, allow_download, progress)
    return profile, weights, digest


def _check_images(profile: EvalProfile, images: Any, side: str, expected: int | None) -> None:
    """Format, size and count of an image set against what the profile pins."""
    wrong = [f for f in images.files if f.suffix.lower() != f".{profile.image_format}"]
    if wrong:
        raise UserError(f"{side} {images.folder} holds {len(wrong)} non-{profile.image_format.upper()} files (e.g. "
                        f"{wrong[0].name}); profile {profile.name} pins {profile.image_format.upper()} (a JPEG "
                        "reference moves FID: LTH14/mage#8)")
    if profile.image_size is not None and images.size != (profile.image_size, profile.image_size):
        raise UserError(f"{side} {images.folder} holds {images.size[0]}x{images.size[1]} images; profile "
                        f"{profile.name} pins {profile.image_size}x{profile.image_size}")
    if expected is not None and images.count != expected:
        raise UserError(f"{side} {images.folder} holds {images.count} images; profile {profile.name} pins "
                        f"{expected}")


def _reference(profile: EvalProfile, real: str | None, run: Any, fake_size: tuple[int, int], cache: Path,
               progress: bool, weights_sha256: str = "") -> Reference:
    import dataclasses

    from mage_bench.config import DataConfig
    from mage_bench.eval.image_sets import dataset_reference, scan_folder

    if profile.reference == "folder":
        images = scan_folder(real)
        _check_images(profile, images, "--real", profile.num_real)
        return Reference(images, str(real), "folder", fields={"reference": str(Path(real).resolve())})
    if profile.reference == "statistics":
        return _statistics_reference(profile, Path(real), weights_sha256)
    name = profile.reference_data or real or run.config.data.name
    if run is not None:  # the run's own pixel settings; only the data set may differ
        data = dataclasses.replace(run.config.data, name=name)
    else:
        data = dataclasses.replace(DataConfig(), name=name, image_size=fake_size[1])
    images = dataset_reference(data, profile.real_split, cache, progress)
    _check_images(profile, images, "reference", profile.num_real)
    return Reference(images, name, profile.real_split)


def _statistics_reference(profile: EvalProfile, path: Path, weights_sha256: str) -> Reference:
    """mu/sigma of a statistics file, checked against the pinned sha256, and when precision/recall/density/
    coverage need the reference's samples: its `activations` (an `eval stats` file of the same extractor and
    weights) or its `arr_0` (the reference images of an ADM batch, run through the extractor here)."""
    import numpy as np

    from mage_bench.eval.statistics import STATISTICS_SUFFIX, load_statistics, reference_activations
    from mage_bench.io import sha256_file

    digest = sha256_file(path)
    if profile.reference_sha256 and not digest.startswith(profile.reference_sha256):
        raise UserError(f"{path} (sha256 {digest[:12]}...) is not the reference profile {profile.name} pins "
                        f"({profile.reference_sha256}...)")
    moments = load_statistics(path)
    made_with = made_weights = None  # torch-fidelity's .pt files hold mu and sigma only
    if path.suffix == STATISTICS_SUFFIX:
        with np.load(path, allow_pickle=False) as data:
            made_with = str(data["extractor"]) if "extractor" in data.files else None
            made_weights = str(data["weights_sha256"]) if "weights_sha256" in data.files else None
    if made_with is not None and made_with != profile.extractor:
        raise UserError(f"{path} holds {made_with} statistics; profile {profile.name} uses {profile.extractor}")
    if made_weights is not None and made_weights != weights_sha256:  # moments of another network's features
        raise UserError(f"{path} was made with {made_with or 'extractor'} weights {made_weights[:12]}, not the "
                        f"{weights_sha256[:12]} in use; write it again with `mage-bench eval stats` or pass those "
                        "weights")
    array = activations = None
    needs_images = bool(set(profile.metrics) & {"precision", "recall", "density", "coverage"})
    if needs_images and path.suffix != STATISTICS_SUFFIX:
        raise UserError(f"{path} holds mu and sigma only: precision/recall/density/coverage need the reference's "
                        "samples (an ADM batch's arr_0 or `eval stats` activations, never moments: LTH14/mar#91)")
    if needs_images:
        activations = reference_activations(path, profile.extractor, weights_sha256)
    if needs_images and activations is None:
        with np.load(path, allow_pickle=False) as data:
            if "arr_0" not in data.files:
                raise UserError(f"{path} holds no reference images (`arr_0`): precision/recall/density/coverage "
                                "need them (never mu/sigma: LTH14/mar#91); use an ADM reference batch or drop "
                                "those metrics")
            array = data["arr_0"]
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
            raise UserError(f"{path}: `arr_0` must be uint8 images [N, H, W, 3], got {array.dtype} {array.shape}")
        if profile.image_size is not None and array.shape[1:3] != (profile.image_size, profile.image_size):
            raise UserError(f"{path}: `arr_0` holds {array.shape[2]}x{array.shape[1]} images; profile "
                            f"{profile.name} pins {profile.image_size}x{profile.image_size}")
    reference = Reference(None, str(path), "statistics", statistics=moments, array=array, activations=activations,
                          fields={"reference": str(path.resolve()), "reference_sha256": digest})
    if profile.num_real is not None and reference.count not in (None, profile.num_real):
        raise UserError(f"{path} holds {reference.count} reference samples; profile {profile.name} pins "
                        f"{profile.num_real}")
    return reference


def _decode_settings(profile: EvalProfile, run: Any) -> tuple[int, float]:
    steps = run.config.generate.steps if profile.decode_steps is None else profile.decode_steps
    temperature = run.config.generate.temperature if profile.decode_temperature is None else profile.decode_temperature
    return steps, temperature


def samples_folder(run: Any, steps: int, temperature: float) -> Path:
    """RUN/samples for the run's own decoding settings, RUN/samples-s<steps>-t<temperature> for others."""
    from mage_bench.runs import SAMPLES_DIR

    if (steps, temperature) == (run.config.generate.steps, run.config.generate.temperature):
        return run.path / SAMPLES_DIR
    return run.path / f"{SAMPLES_DIR}-s{steps}-t{temperature:g}"


def _generate(run: Any, num: int, steps: int, temperature: float, device: str, progress: bool) -> Any:
    from mage_bench.eval.image_sets import scan_folder
    from mage_bench.samples import generate_images

    folder = samples_folder(run, steps, temperature)
    generate_images(run, num, folder, steps=steps, temperature=temperature, progress=progress, device=device)
    images = scan_folder(folder, f"{num} images generated by {run.path.name} ({steps} steps, temperature "
                                 f"{temperature:g})")
    if images.count != num:
        raise UserError(f"{folder} holds {images.count} images, not {num}; empty the folder or use a profile with "
                        f"num_samples: {images.count}")
    return images


@dataclass(frozen=True)
class Streamed:
    """A run's images rendered batch by batch into the feature pass (no PNG files)."""

    source: Any  # feature_sets.ImageSource with `render`
    count: int
    size: tuple[int, int]


def _sample_count(profile: EvalProfile, reference: Reference) -> int:
    from mage_bench.eval.profile_metrics import check_sizes

    num = profile.num_samples or reference.count
    if num is None:
        raise UserError(f"profile {profile.name} pins no num_samples and its reference has no image count; "
                        "set num_samples in the profile")
    check_sizes(profile, reference.count, num)  # before generating: a count the metrics refuse fails now
    return num


def _streamed_images(profile: EvalProfile, run: Any, reference: Reference) -> Streamed:
    """The images `generate_images` would write (same seed, batches, quantisation), as a render function keyed
    on what makes them: the checkpoint's sha256, the decoding settings, the PNG quantisation and the count."""
    from mage_bench.eval.feature_sets import BATCH_SIZE, ImageSource
    from mage_bench.samples import render_uint8

    num = _sample_count(profile, reference)
    steps, temperature = _decode_settings(profile, run)
    side = run.config.data.image_size
    if profile.image_size is not None and side != profile.image_size:
        raise UserError(f"{run.path.name} generates {side}x{side} images; profile {profile.name} pins "
                        f"{profile.image_size}x{profile.image_size}")
    from mage_bench.results import config_hash

    # The config hash names the tokenizer by its weights' content: the decoder is part of what makes the pixels
    identity = (f"generated:{run.checkpoint_sha256}:{config_hash(run.config)}:steps={steps}:"
                f"temperature={temperature}:seed=0:png={run.config.generate.png}:batch={BATCH_SIZE}:{side}x{side}")
    source = ImageSource(identity=identity, count=num, description=f"{num} images decoded by {run.path.name}",
                         render=lambda indices: render_uint8(run, indices, steps, temperature, seed=0))
    return Streamed(source, num, (side, side))


def _run_images(profile: EvalProfile, run: Any, reference: Reference, device: str, progress: bool) -> Any:
    """The run's generated images under the profile (decoded now unless they exist already)."""
    num = _sample_count(profile, reference)
    steps, temperature = _decode_settings(profile, run)
    images = _generate(run, num, steps, temperature, device, progress)
    _check_images(profile, images, "generated", None)
    return images


def generate_for_profile(run: Any, profile: EvalProfile | str, real: str | None, cache_dir: str | Path | None,
                         device: str, progress: bool = False) -> Any:
    """A run's images as `evaluate_profile` will read them (a sweep times generation apart from evaluation)."""
    from mage_bench.eval.image_sets import DEFAULT_CACHE

    profile = load_profile(profile) if isinstance(profile, str) else profile
    cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    reference = _reference(profile, real, run, (run.config.data.image_size,) * 2, cache, progress)
    return _run_images(profile, run, reference, device, progress)


def evaluate_profile(fake: str | Path | Any, real: str | None, profile: EvalProfile | str,
                     weights: str | None = None, device: str = "auto", cache_dir: str | Path | None = None,
                     progress: bool = False, sweep: str | None = None, seed: int = 0,
                     write: bool = True, stream: bool = False) -> list[dict[str, Any]]:
    """The profile's metrics of `fake` (a folder, a run folder or a `LoadedRun`) against its reference
    (`real`: the folder, statistics file or data set the profile's reference kind asks for). A run's records
    are also written to RUN/eval/fid-<profile>.json unless `write` is off. `stream`: a run's images go from
    the decoder to the extractor in memory, quantised exactly as their PNG files would be (no files written;
    the same features). Returns the records."""
    from mage_bench.eval.feature_sets import ImageSource, image_features
    from mage_bench.eval.image_sets import DEFAULT_CACHE, scan_folder
    from mage_bench.eval.profile_metrics import Side, check_sizes
    from mage_bench.runs import CHECKPOINT_FILE, LoadedRun, load_run, resolve_device

    start = time.perf_counter()
    is_run = isinstance(fake, LoadedRun) or (Path(fake) / CHECKPOINT_FILE).is_file()
    profile, weights_file, weights_sha256 = check_profile_inputs(profile, real, weights, is_run, progress,
                                                                 allow_download=True)
    device = resolve_device(device)
    cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    run = fake if isinstance(fake, LoadedRun) else (load_run(fake, device) if is_run else None)
    if stream and run is None:
        raise UserError("--stream-samples hands a run's images from its decoder to the extractor; --fake "
                        f"{fake} is a folder of images: drop --stream-samples")
    fake_set = None if run is not None else scan_folder(fake)
    if fake_set is not None:
        _check_images(profile, fake_set, "--fake", profile.num_samples)
    size = fake_set.size if fake_set is not None else (run.config.data.image_size,) * 2
    reference = _reference(profile, real, run, size, cache, progress, weights_sha256)
    timings: dict[str, float] = {}
    if run is not None and stream:
        fake_set = _streamed_images(profile, run, reference)
        steps, temperature = _decode_settings(profile, run)
        seed = run.config.seed
    elif run is not None:
        t0 = time.perf_counter()
        fake_set = _run_images(profile, run, reference, device, progress)
        timings["generate_s"] = round(time.perf_counter() - t0, 3)
        steps, temperature = _decode_settings(profile, run)
        seed = run.config.seed
    else:
        steps = temperature = None
    check_sizes(profile, reference.count, fake_set.count)

    from mage_bench.eval.extractors import FID_EXTRACTORS

    extractor = FID_EXTRACTORS.get(profile.extractor)

    def features(source: ImageSource, label: str) -> Any:
        feature_set = image_features(source, extractor, weights_file, weights_sha256, device, cache, progress)
        timings[f"{label}_features_s"] = round(feature_set.seconds, 3)
        timings[f"{label}_features_cached"] = not feature_set.extracted
        return feature_set

    fake_source = fake_set.source if isinstance(fake_set, Streamed) else ImageSource.of_images(fake_set)
    fake_features = features(fake_source, "fake")  # streamed: generation happens inside this pass
    if reference.images is not None:
        real_features = features(ImageSource.of_images(reference.images), "real")
        real_side = Side(real_features.features, real_features.logits)
    elif reference.activations is not None:
        real_side = Side(reference.activations, moments=reference.statistics)
    elif reference.array is not None:
        source = ImageSource(identity=f"statistics:{reference.fields['reference_sha256']}:arr_0",
                             count=len(reference.array), description=f"{reference.dataset} arr_0",
                             array=reference.array)
        real_side = Side(features(source, "real").features, moments=reference.statistics)
    else:
        real_side = Side(None, moments=reference.statistics)
    t0 = time.perf_counter()
    from mage_bench.eval.profile_metrics import profile_metrics

    values = profile_metrics(profile, real_side, Side(fake_features.features, fake_features.logits), seed)
    timings["metrics_s"] = round(time.perf_counter() - t0, 3)
    timings["total_s"] = round(time.perf_counter() - start, 3)
    common = {"profile": profile.name, "profile_hash": profile.hash, "profile_version": profile.version,
              "profile_metrics": ",".join(profile.metrics), "profile_settings": profile.settings,
              "sample_seed": 0 if run is not None else None,  # `generate_images`' seed of a run's images
              "backend": BACKEND, "n_real": reference.count, "standard_extractor": profile.standard,
              "weights_sha256": weights_sha256, "fake_size": f"{fake_set.size[0]}x{fake_set.size[1]}",
              "decode_steps": steps, "decode_temperature": temperature, "samples_streamed": isinstance(
                  fake_set, Streamed), **(reference.fields or {}), **timings}
    if reference.images is not None:
        common["real_size"] = f"{reference.images.size[0]}x{reference.images.size[1]}"
    rows = [(metric, value.pop("value"), {**common, **value}) for metric, value in values.items()]
    rows.sort(key=lambda row: profile.metrics.index(row[0]))
    return _records(profile, run, fake_set, reference, rows, seed, sweep, write)


def _records(profile: EvalProfile, run: Any, fake_set: Any, reference: Reference, rows: list, seed: int,
             sweep: str | None, write: bool) -> list[dict[str, Any]]:
    from mage_bench.eval.fid_backends import METRICS
    from mage_bench.results import RecordContext, build_records, config_hash, write_records

    context = RecordContext(evaluator=EVALUATOR, run=run.path.name if run is not None else fake_set.folder.name,
                            dataset=reference.dataset, split=reference.split, feature_extractor=profile.extractor,
                            n_samples=fake_set.count, seed=seed, config_hash=config_hash(run.config) if run else None,
                            sweep=sweep)
    records = build_records(context, METRICS, rows)
    if run is not None and write:
        from mage_bench.runs import EVAL_DIR

        write_records(run.path / EVAL_DIR / f"{records_name(profile)}.json", records)
    return [r.as_dict() for r in records]
