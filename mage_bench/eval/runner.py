"""Representation evaluators wired to runs: one feature pass (cached), then any of the evaluators.

`EVALUATORS` is the registry of evaluators on cached features; each entry maps (train_x, train_y,
test_x, test_y, seed) to rows of (metric, value, higher_is_better, evaluator-specific fields).
`RUN_EVALUATORS` holds those that need the run itself (the faithful linear probe feeds fresh
augmented views through the encoder every epoch). `evaluate_run` writes the rows of either kind as
result records to RUN/eval/NAME.json.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mage_bench.config import DataConfig
from mage_bench.errors import UserError
from mage_bench.registry import Registry, did_you_mean

Row = tuple[str, float, bool, dict[str, Any]]
Evaluator = Callable[..., list[Row]]  # (train_x, train_y, test_x, test_y, seed, **options) -> rows
EVALUATORS: Registry[Evaluator] = Registry("evaluator")
# (run: LoadedRun, data: DataConfig, seed, device=, progress=, **options) -> (rows, test images)
RunEvaluator = Callable[..., tuple[list[Row], int]]
RUN_EVALUATORS: Registry[RunEvaluator] = Registry("evaluator")
EVAL_ALL = ("linear", "fewshot", "knn")  # `eval all`; the paper's LARS probes are asked for by name
KNN_KS = (10, 20, 100, 200)
FEATURE_EXTRACTOR = "mage-probe"  # the run's own encoder, official probe feature


@EVALUATORS.register("linear")
def _linear(train_x, train_y, test_x, test_y, seed: int) -> list[Row]:
    from mage_bench.eval.linear import linear_probe

    r = linear_probe(train_x, train_y, test_x, test_y, seed=seed)
    extra = {"C": r["C"], "val_top1": r["val_top1"]}
    return [("top1", r["top1"], True, extra), ("top5", r["top5"], True, extra)]


def _mae_rows(result: dict[str, Any], protocol: str, augment: str, test_view: str) -> list[Row]:
    """Rows of a paper-protocol probe; `protocol` keeps mae and mae-cached numbers apart in reports."""
    extra = {"protocol": protocol, "augment": augment, "test_view": test_view,
             **{k: result[k] for k in ("lr", "epochs", "warmup_epochs", "batch_size")}}
    return [("top1", result["top1"], True, extra), ("top5", result["top5"], True, extra)]


@EVALUATORS.register("linear-mae-cached")
def _linear_mae_cached(train_x, train_y, test_x, test_y, seed: int, device: str = "cpu", **options) -> list[Row]:
    from mage_bench.eval.features import TRANSFORM
    from mage_bench.eval.linear import linear_probe_mae

    r = linear_probe_mae(train_x, train_y, test_x, test_y, seed=seed, device=device, **options)
    # The cached features are one deterministic view per image, the same for training and test.
    return _mae_rows(r, "mae-cached", augment="none", test_view=TRANSFORM)


@RUN_EVALUATORS.register("linear-mae")
def _linear_mae(run: Any, data: DataConfig, seed: int, device: str = "cpu", progress: bool = False,
                **options) -> tuple[list[Row], int]:
    from mage_bench.eval.linear_views import linear_probe_mae_views

    r = linear_probe_mae_views(run, data, seed=seed, device=device, progress=progress, **options)
    return _mae_rows(r, "mae", augment=r["augment"], test_view=r["test_view"]), r["n_test"]


@EVALUATORS.register("fewshot")
def _fewshot(train_x, train_y, test_x, test_y, seed: int) -> list[Row]:
    from mage_bench.eval.fewshot import few_shot

    rows = []
    for shots, r in few_shot(train_x, train_y, test_x, test_y, seed=seed).items():
        rows.append(("top1", r["mean"], True, {"shots": shots, "std": r["std"], "ci_low": r["ci_low"],
                                               "ci_high": r["ci_high"], "draws": r["draws"]}))
    return rows


@EVALUATORS.register("knn")
def _knn(train_x, train_y, test_x, test_y, seed: int) -> list[Row]:
    from mage_bench.eval.knn import knn_classify, retrieval_metrics

    rows = []
    for k in KNN_KS:
        r = knn_classify(train_x, train_y, test_x, test_y, k=k, temperature=0.07)
        extra = {"k": r["k"], "temperature": 0.07}
        rows += [("top1", r["top1"], True, extra), ("top5", r["top5"], True, extra)]
    # Retrieval: test images as queries against the train split, same class = relevant.
    r = retrieval_metrics(train_x, train_y, test_x, test_y, precision_ks=(10,))
    rows += [("map_at_r", r["map_at_r"], True, {"queries": r["queries"]}),
             ("precision_at_10", r["precision_at_10"], True, {})]
    return rows


def run_data_config(config: Any, name: str | None = None) -> DataConfig:
    """A run config's data settings, optionally pointed at another data set of that layout."""
    import dataclasses

    return dataclasses.replace(config.data, name=name) if name else config.data


def check_evaluator(name: str) -> None:
    """A `UserError` naming the choices unless `name` is a registered evaluator of either kind."""
    if name not in EVALUATORS and name not in RUN_EVALUATORS:
        names = sorted(EVALUATORS.names() + RUN_EVALUATORS.names())
        raise UserError(f"unknown evaluator {name!r}{did_you_mean(name, names)}; choose one of: {', '.join(names)}")


def evaluate_run(run_dir: str | Path | Any, names: list[str], data_name: str | None = None, progress: bool = False,
                 device: str = "cpu", options: dict[str, dict[str, Any]] | None = None,
                 cache_dir: str | Path | None = None, sweep: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """Run the named evaluators on the run's cached features (or on the run, for `RUN_EVALUATORS`);
    write and return their records.

    The run is loaded once; its own data settings apply, `data_name` only swaps the data set.
    Features are cached under RUN/eval/cache unless `cache_dir` says otherwise, and extracted only
    when an evaluator on features is asked for.
    """
    from mage_bench.results import ResultRecord, config_hash, write_records
    from mage_bench.runs import EVAL_DIR, LoadedRun, load_run

    names = list(dict.fromkeys(names))  # asked twice, run once
    for name in names:
        check_evaluator(name)  # typos fail before any work
    run = run_dir if isinstance(run_dir, LoadedRun) else load_run(run_dir, device)
    config, data = run.config, run_data_config(run.config, data_name)
    features = None
    if any(name in EVALUATORS for name in names):
        features = _cached_features(run, data, device, cache_dir, progress)
    written = {}
    for name in names:
        name_options = (options or {}).get(name, {})
        if name in RUN_EVALUATORS:
            rows, n_test = RUN_EVALUATORS.get(name)(run, data, config.seed, device=device, progress=progress,
                                                    **name_options)
        else:
            rows, n_test = EVALUATORS.get(name)(*features, config.seed, **name_options), len(features[3])
        records = [ResultRecord(sweep=sweep, run=run.path.name, evaluator=name, metric=metric, value=float(value),
                                higher_is_better=better, n_samples=int(n_test), dataset=data.name, split="test",
                                feature_extractor=FEATURE_EXTRACTOR, seed=config.seed,
                                config_hash=config_hash(config), extra=extra)
                   for metric, value, better, extra in rows]
        write_records(run.path / EVAL_DIR / f"{name}.json", records)
        written[name] = [r.as_dict() for r in records]
    return written


def _cached_features(run: Any, data: DataConfig, device: str, cache_dir: str | Path | None,
                     progress: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_x, train_y, test_x, test_y) of the run's probe features, from the cache when present."""
    from mage_bench.eval.features import extract_features

    train_x, train_y, _ = extract_features(run, data, "train", device=device, cache_dir=cache_dir, progress=progress)
    test_x, test_y, _ = extract_features(run, data, "test", device=device, cache_dir=cache_dir, progress=progress)
    return np.asarray(train_x), train_y, np.asarray(test_x), test_y


# --------------------------------------------------------------------------------------------
# Generation metrics

# record metric name -> (higher is better, the backend's key of its spread or None)
GENERATION_METRICS = {"fid": (False, None), "is": (True, "is_std"), "kid": (False, "kid_std"),
                      "precision": (True, None), "recall": (True, None)}
FLAG_METRICS = {"fid": ("fid",), "isc": ("is",), "kid": ("kid",), "prc": ("precision", "recall")}


def default_extractor(real: str) -> str:
    """digits-cnn for the bundled digits (Inception weights are meaningless on 8x8 digits), else Inception."""
    from mage_bench.data import DatasetSpec

    return "digits-cnn" if not Path(real).is_dir() and DatasetSpec.parse(real).name == "digits" else "inception-v3"


def evaluate_generation(fake: str | Path | Any, real: str, metrics: tuple[str, ...] = ("fid",), num: int | None = None,
                        extractor: str | None = None, backend: str = "torch-fidelity", weights: str | None = None,
                        split: str = "train", cache_dir: str | Path | None = None, device: str = "cpu",
                        seed: int = 0, progress: bool = False, sweep: str | None = None) -> list[dict[str, Any]]:
    """FID (+ IS/KID/PR) of `fake` (a folder, a run folder or a `LoadedRun`) against `real`; returns records.

    When `fake` is a run, `num` images are generated into RUN/samples and the records are written to
    RUN/eval/fid.json; a data set given as `real` is then rendered with the run's data settings.
    """
    import dataclasses

    from mage_bench.data import DATASETS, DatasetSpec
    from mage_bench.eval.extractors import FID_EXTRACTORS
    from mage_bench.eval.generation import (
        DEFAULT_CACHE,
        Request,
        check_backend,
        dataset_reference,
        generation_metrics,
        resolve_fake,
        scan_folder,
    )
    from mage_bench.results import ResultRecord, config_hash, write_records
    from mage_bench.runs import CHECKPOINT_FILE, EVAL_DIR, SAMPLES_DIR, LoadedRun, load_run
    from mage_bench.sampling import generate_images

    metrics = tuple(dict.fromkeys(metrics))  # asked twice (e.g. eval all --kid) is computed once
    unknown = set(metrics) - set(FLAG_METRICS)
    if unknown:
        raise UserError(f"unknown generation metric {sorted(unknown)[0]!r}; use {', '.join(FLAG_METRICS)}")
    check_backend(backend, metrics)  # typos and unsupported metrics fail before any work
    spec = FID_EXTRACTORS.get(extractor or default_extractor(real))
    cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE

    run = fake if isinstance(fake, LoadedRun) else None
    if run is None and (Path(fake) / CHECKPOINT_FILE).is_file():
        run = load_run(fake, device)
    fake_set = resolve_fake(str(fake), num) if run is None else None  # cheap folder checks first
    weights_file = spec.resolve_weights(weights, progress)  # then the weights, before any generation
    if run is not None:
        if num is None:
            raise UserError(f"--fake {run.path} is a run: say how many images to generate with --num N")
        generate_images(run, num, run.path / SAMPLES_DIR, progress=progress, device=device)
        fake_set = scan_folder(run.path / SAMPLES_DIR, f"{num} images generated by {run.path.name}")
        if fake_set.count != num:
            raise UserError(f"{run.path / SAMPLES_DIR} holds {fake_set.count} images, not {num}; "
                            f"pass --num {fake_set.count} or empty the folder")

    if Path(real).is_dir():
        real_set, dataset, real_split = scan_folder(real), str(real), "folder"
    else:
        name = DatasetSpec.parse(real).name
        if name not in DATASETS:
            raise UserError(f"--real {real!r} is neither a folder nor a data set ({', '.join(DATASETS.names())})")
        if run is not None:  # the run's own image size, split and crop; only the data set may differ
            data = dataclasses.replace(run.config.data, name=real)
        else:
            data = dataclasses.replace(DataConfig(), name=real, image_size=fake_set.size[1])
        real_set, dataset, real_split = dataset_reference(data, split, cache, progress), real, split

    request = Request(fake=fake_set, real=real_set, metrics=frozenset(metrics), extractor=spec,
                      weights=weights_file, device=device, cache_dir=cache, seed=seed,
                      progress=progress)
    values = generation_metrics(request, backend)
    extra_all = {"backend": backend, "n_real": real_set.count, "standard_extractor": spec.standard,
                 "fake_size": f"{fake_set.size[0]}x{fake_set.size[1]}",
                 "real_size": f"{real_set.size[0]}x{real_set.size[1]}"}
    records = []
    for flag in metrics:
        for metric in FLAG_METRICS[flag]:
            if metric not in values:
                continue
            better, spread = GENERATION_METRICS[metric]
            extra = dict(extra_all)
            if spread and spread in values:
                extra["std"] = values[spread]
            if metric == "kid":
                extra["kid_subset_size"] = request.kid_subset_size
            records.append(ResultRecord(
                sweep=sweep, run=run.path.name if run else fake_set.folder.name, evaluator="fid", metric=metric,
                value=values[metric], higher_is_better=better, n_samples=fake_set.count, dataset=dataset,
                split=real_split, feature_extractor=spec.name, seed=run.config.seed if run else seed,
                config_hash=config_hash(run.config) if run else None, extra=extra))
    if run is not None:
        write_records(run.path / EVAL_DIR / "fid.json", records)
    return [r.as_dict() for r in records]


def evaluate_all(run_dir: str | Path | Any, data_name: str | None = None,
                 generation: tuple[str, ...] = ("fid", "isc", "kid"), num: int | None = None,
                 extractor: str | None = None, backend: str = "torch-fidelity", weights: str | None = None,
                 split: str = "train", cache_dir: str | Path | None = None, device: str = "cpu",
                 progress: bool = False, sweep: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """One load and one feature pass for linear, few-shot and kNN, then FID (+IS/KID) of `num` samples.

    `run_dir` is a run folder or a `LoadedRun`. `num` defaults to the number of reference images
    (the `split` of the run's data set), so both sides of the Fréchet distance have the same count.
    Writes RUN/eval/{linear,fewshot,knn,fid}.json.
    """
    from mage_bench.runs import LoadedRun, load_run

    run = run_dir if isinstance(run_dir, LoadedRun) else load_run(run_dir, device)
    data = run_data_config(run.config, data_name)
    if num is None:
        num = reference_count(data, split)
    written = evaluate_run(run, list(EVAL_ALL), data_name=data_name, progress=progress, device=device, sweep=sweep)
    written["fid"] = evaluate_generation(run, data.name, generation, num=num, extractor=extractor, backend=backend,
                                         weights=weights, split=split, cache_dir=cache_dir, device=device,
                                         seed=run.config.seed, progress=progress, sweep=sweep)
    return written


def reference_count(data: DataConfig, split: str) -> int:
    """Images in the reference split: the default number of samples for the generation metrics."""
    from mage_bench.data import create_dataset

    return len(create_dataset(data, split, train_transform=False))
