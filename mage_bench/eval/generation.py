"""Evaluating generation: FID (+ IS/KID/PR) of a run's samples or a folder against a reference.

Three stages, each a function: `plan_generation` resolves and checks every input before any work (the
metric flags, the backend, the extractor and its weights, the run or folder); the part of it that needs
no run or folder, `check_generation_inputs`, is public so a sweep can call it before any training;
`generate_run_samples`
decodes a run's images into RUN/samples (skipping those already there); `evaluate_generation` then
renders the real side, computes through the backend (`fid_backends`) and builds the records.

`--fake` is a folder or a run folder; `--real` is a folder, a data set (its split written once as
PNGs into the cache, with the run's own data settings when the fake side is a run) or a statistics file (.npz, .pt)
(`eval.statistics`: FID against published moments, e.g. an ADM reference batch).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mage_bench.config import DEFAULT_EVAL, DataConfig, EvalConfig
from mage_bench.errors import UserError
from mage_bench.eval.fid_backends import FLAGS, METRICS, SPREADS, Request, check_backend, compute_metrics
from mage_bench.eval.image_sets import DEFAULT_CACHE, ImageSet, dataset_reference, resolve_fake, scan_folder
from mage_bench.eval.statistics import is_statistics_file, load_statistics
from mage_bench.results import RecordContext, build_records, config_hash, write_records

EVALUATOR = "fid"  # the records' evaluator, and RUN/eval/fid.json


@dataclass(frozen=True)
class GenerationPlan:
    """Everything checked and resolved before any image is generated or read."""

    flags: tuple[str, ...]  # keys of fid_backends.FLAGS
    settings: EvalConfig
    extractor: Any  # extractors.FidExtractor
    weights: Path
    device: str
    cache: Path
    run: Any | None  # a LoadedRun when the fake side is a run
    fake: ImageSet | None  # the fake folder (None for a run: its samples come later)
    statistics: tuple[Any, Any] | None = None  # (mu, sigma) when the real side is a statistics file


def default_extractor(real: str) -> str:
    """digits-cnn for the bundled digits (Inception weights are meaningless on 8x8 digits), else Inception."""
    from mage_bench.data import DatasetSpec

    if Path(real).is_dir() or is_statistics_file(real):
        return "inception-v3"
    return "digits-cnn" if DatasetSpec.parse(real).name == "digits" else "inception-v3"


def _checked_flags(settings: EvalConfig, real: str, flags: tuple[str, ...]) -> tuple[tuple[str, ...], Any]:
    """(the flags, deduplicated; the extractor) after the checks that read nothing: flag names, backend,
    extractor name, and `real` being a folder or a known data set."""
    from mage_bench.data import DATASETS, DatasetSpec
    from mage_bench.eval.extractors import FID_EXTRACTORS

    flags = tuple(dict.fromkeys(flags))  # asked twice (e.g. eval all --kid) is computed once
    unknown = set(flags) - set(FLAGS)
    if unknown:
        raise UserError(f"unknown generation metric {sorted(unknown)[0]!r}; use {', '.join(FLAGS)}")
    check_backend(settings.backend, flags)  # typos and unsupported metrics fail before any work
    if is_statistics_file(real):
        if flags != ("fid",):
            raise UserError(f"--real {real} is a statistics file (mu, sigma): it gives FID only; drop "
                            "--isc/--kid/--prc or give the reference images")
        if settings.backend != "torch-fidelity":
            raise UserError(f"--real {real} is a statistics file: the generated images' features come from "
                            f"torch-fidelity's pipeline, not {settings.backend}; drop --backend")
    elif not Path(real).is_dir() and DatasetSpec.parse(real).name not in DATASETS:
        raise UserError(f"--real {real!r} is neither a folder, a data set ({', '.join(DATASETS.names())}) nor a "
                        "statistics file (.npz, or torch-fidelity's .pt)")
    return flags, FID_EXTRACTORS.get(settings.extractor or default_extractor(real))


def check_generation_inputs(settings: EvalConfig, real: str, flags: tuple[str, ...], progress: bool = False,
                            allow_download: bool = False) -> Path:
    """Check what a generation evaluation needs besides its images, and return the extractor's weights file.

    Checks the metric flags and the backend, that `real` is a folder or a data set, picks the extractor
    (`settings.extractor`, else `default_extractor(real)`) and resolves its weights (`settings.weights`,
    else the extractor's own place). Loads no run and generates nothing, so a sweep can call it before
    any training. Nothing is downloaded unless `allow_download`: missing Inception weights are then a
    one-line UserError naming the file, `--weights` and $MAGE_BENCH_INCEPTION_WEIGHTS. (digits-cnn weights
    are trained locally on first use, ~15 s, whatever `allow_download` says.)"""
    _, extractor = _checked_flags(settings, real, flags)
    return extractor.resolve_weights(settings.weights, progress, allow_download=allow_download)


def plan_generation(fake: str | Path | Any, real: str, settings: EvalConfig, flags: tuple[str, ...],
                    cache_dir: str | Path | None = None, progress: bool = False) -> GenerationPlan:
    """Check the flags, backend, fake side and extractor weights, cheapest first; load a run once."""
    from mage_bench.runs import CHECKPOINT_FILE, LoadedRun, load_run, resolve_device

    flags, extractor = _checked_flags(settings, real, flags)
    statistics = load_statistics(real) if is_statistics_file(real) else None  # read once, before any image
    device = resolve_device(settings.device)
    run = fake if isinstance(fake, LoadedRun) else None
    if run is None and (Path(fake) / CHECKPOINT_FILE).is_file():
        run = load_run(fake, device)
    if run is not None and settings.num_samples is None:
        raise UserError(f"--fake {run.path} is a run: say how many images to generate with --num-samples N")
    fake_set = resolve_fake(str(fake), settings.num_samples) if run is None else None  # cheap folder checks
    # Then the weights, before any generation (`eval fid` downloads the Inception weights when missing).
    weights = check_generation_inputs(settings, real, flags, progress, allow_download=True)
    return GenerationPlan(flags, settings, extractor, weights, device,
                          Path(cache_dir) if cache_dir else DEFAULT_CACHE, run, fake_set, statistics)


def _fake_images(plan: GenerationPlan, progress: bool, samples: ImageSet | None = None) -> ImageSet:
    """The generated side: the folder, or the run's `num_samples` images (`samples` when given already)."""
    if plan.run is None:
        return plan.fake
    return samples or generate_run_samples(plan.run, plan.settings.num_samples, plan.device, progress)


def _request(plan: GenerationPlan, fake_set: ImageSet, real_set: ImageSet, seed: int, progress: bool) -> Request:
    return Request(fake=fake_set, real=real_set, metrics=frozenset(plan.flags), extractor=plan.extractor,
                   weights=plan.weights, device=plan.device, cache_dir=plan.cache, seed=seed, progress=progress)


def generate_run_samples(run: Any, num: int, device: str, progress: bool = False) -> ImageSet:
    """`num` images decoded from the run into RUN/samples (those already there are kept)."""
    from mage_bench.runs import SAMPLES_DIR
    from mage_bench.samples import generate_images

    folder = run.path / SAMPLES_DIR
    generate_images(run, num, folder, progress=progress, device=device)
    images = scan_folder(folder, f"{num} images generated by {run.path.name}")
    if images.count != num:
        raise UserError(f"{folder} holds {images.count} images, not {num}; "
                        f"pass --num-samples {images.count} or empty the folder")
    return images


def real_images(plan: GenerationPlan, real: str, fake: ImageSet, progress: bool) -> tuple[ImageSet, str, str]:
    """(the real side, its `dataset` field, its `split` field): a folder, or a data set's split as PNGs
    (`real` was checked to be one or the other by `plan_generation`)."""
    if Path(real).is_dir():
        return scan_folder(real), str(real), "folder"
    if plan.run is not None:  # the run's own image size, split and crop; only the data set may differ
        data = dataclasses.replace(plan.run.config.data, name=real)
    else:
        data = dataclasses.replace(DataConfig(), name=real, image_size=fake.size[1])
    split = plan.settings.real_split
    return dataset_reference(data, split, plan.cache, progress), real, split


def evaluate_generation(fake: str | Path | Any, real: str, settings: EvalConfig = DEFAULT_EVAL,
                        flags: tuple[str, ...] = ("fid",), cache_dir: str | Path | None = None,
                        progress: bool = False, sweep: str | None = None, seed: int = 0,
                        samples: ImageSet | None = None) -> list[dict[str, Any]]:
    """FID (+ IS/KID/PR, by `flags`) of `fake` (a folder, a run folder or a `LoadedRun`) against `real`.

    A run's `settings.num_samples` images are generated first, unless `samples` holds them already; its
    records are also written to RUN/eval/fid.json. Returns the records.
    """
    plan = plan_generation(fake, real, settings, flags, cache_dir, progress)
    fake_set = _fake_images(plan, progress, samples)
    seed = plan.run.config.seed if plan.run is not None else seed
    if plan.statistics is not None:
        return _records(plan, _statistics_rows(plan, fake_set, Path(real), progress), fake_set, str(real),
                        "statistics", seed, sweep)
    real_set, dataset, split = real_images(plan, real, fake_set, progress)
    request = _request(plan, fake_set, real_set, seed, progress)
    values = compute_metrics(request, settings.backend)
    return _records(plan, generation_rows(plan, request, values), fake_set, dataset, split, seed, sweep)


def _records(plan: GenerationPlan, rows: list[tuple[str, float, dict]], fake_set: ImageSet, dataset: str, split: str,
             seed: int, sweep: str | None) -> list[dict[str, Any]]:
    """The rows as records (written to RUN/eval/fid.json when the fake side is a run)."""
    context = RecordContext(evaluator=EVALUATOR, run=plan.run.path.name if plan.run else fake_set.folder.name,
                            dataset=dataset, split=split, feature_extractor=plan.extractor.name,
                            n_samples=fake_set.count, seed=seed,
                            config_hash=config_hash(plan.run.config) if plan.run else None, sweep=sweep)
    records = build_records(context, METRICS, rows)
    if plan.run is not None:
        from mage_bench.runs import EVAL_DIR

        write_records(plan.run.path / EVAL_DIR / f"{EVALUATOR}.json", records)
    return [r.as_dict() for r in records]


def _statistics_rows(plan: GenerationPlan, fake_set: ImageSet, statistics: Path,
                     progress: bool) -> list[tuple[str, float, dict]]:
    """FID against a statistics file (`eval.statistics`): the record says which file (sha256) and how."""
    from mage_bench.eval.statistics import fid_against_statistics

    result = fid_against_statistics(fake_set.files, statistics, plan.statistics, plan.extractor, plan.weights,
                                    plan.device, progress)
    return [("fid", result["fid"], {"backend": "torch-fidelity features + statistics file",
                                    "reference": str(statistics.resolve()),
                                    "reference_sha256": result["reference_sha256"],
                                    "standard_extractor": plan.extractor.standard,
                                    "fake_size": f"{fake_set.size[0]}x{fake_set.size[1]}"})]


def compare_backends(fake: str | Path | Any, real: str, settings: EvalConfig = DEFAULT_EVAL,
                     flags: tuple[str, ...] = ("fid",), cache_dir: str | Path | None = None,
                     progress: bool = False) -> dict[str, Any]:
    """FID (and KID with the "kid" flag) of the same images through every backend that computes them, with the
    same extractor and weights: {"backends": {name: {metric: value}}, "differences": {metric: {"a - b": ...}}, ...}.

    A check of the libraries against each other, so no record is written. A run's images are generated (or
    reused) once. Where the numbers differ, the cause is the resize to the extractor's input (`fid_backends`)."""
    from mage_bench.eval.fid_backends import BACKENDS

    wanted = tuple(dict.fromkeys(flags))
    if is_statistics_file(real):
        raise UserError("--compare-backends runs each library on reference images; a statistics file is read by "
                        "mage-bench alone: give the reference folder or data set")
    names = sorted((name for name in BACKENDS.names() if set(wanted) <= BACKENDS.get(name).metrics),
                   key=lambda name: name != settings.backend)  # the configured backend first: "it - other"
    if len(names) < 2:
        raise UserError(f"only {', '.join(names) or 'no backend'} computes {', '.join(wanted)}: "
                        "--compare-backends compares fid and kid")
    plan = plan_generation(fake, real, settings, wanted, cache_dir, progress)
    fake_set = _fake_images(plan, progress)
    real_set, dataset, split = real_images(plan, real, fake_set, progress)
    request = _request(plan, fake_set, real_set, plan.run.config.seed if plan.run is not None else 0, progress)
    keys = [key for flag in wanted for key in FLAGS[flag]]
    values = {name: {k: v for k, v in compute_metrics(request, name).items() if k in keys} for name in names}
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    differences = {key: {f"{a} - {b}": values[a][key] - values[b][key] for a, b in pairs} for key in keys}
    return {"backends": values, "differences": differences, "extractor": plan.extractor.name,
            "standard_extractor": plan.extractor.standard, "n_samples": fake_set.count, "n_real": real_set.count,
            "fake_size": f"{fake_set.size[0]}x{fake_set.size[1]}",
            "real_size": f"{real_set.size[0]}x{real_set.size[1]}",
            "dataset": dataset, "split": split}


def generation_rows(plan: GenerationPlan, request: Request, values: dict[str, float]) -> list[tuple[str, float, dict]]:
    """One row per computed metric, in flag order, with what every generation record says about its inputs."""
    common = {"backend": plan.settings.backend, "n_real": request.real.count,
              "standard_extractor": plan.extractor.standard,
              "fake_size": f"{request.fake.size[0]}x{request.fake.size[1]}",
              "real_size": f"{request.real.size[0]}x{request.real.size[1]}"}
    rows = []
    for flag in plan.flags:
        for key in FLAGS[flag]:
            if key not in values:
                continue
            extra = dict(common)
            if SPREADS.get(key) in values:
                extra["std"] = values[SPREADS[key]]
            if key == "kid":
                extra["kid_subset_size"] = request.kid_subset_size
            rows.append((key, values[key], extra))
    return rows
