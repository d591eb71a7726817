"""Representation evaluators wired to runs: one feature pass (cached), then any of the evaluators.

`EVALUATORS` is the registry. Each entry declares its metrics (`mage_bench.metrics.Metric`, next to its
code) and computes rows (metric key, value, evaluator-specific fields) either on cached features
(train_x, train_y, test_x, test_y) or, for `on_run` entries, on the run itself (the faithful linear
probe feeds fresh augmented views through the encoder every epoch). Every setting comes from one
`EvalConfig`. `evaluate_run` builds the rows into result records (`results.build_records`) and writes
them to RUN/eval/NAME.json; `evaluate_all` adds the generation metrics (`eval/generation.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mage_bench.config import DEFAULT_EVAL, DataConfig, EvalConfig
from mage_bench.errors import UserError
from mage_bench.eval import fewshot, knn, linear, linear_views
from mage_bench.metrics import Metric
from mage_bench.registry import Registry, did_you_mean
from mage_bench.results import Row


@dataclass(frozen=True)
class Evaluator:
    # on features: (train_x, train_y, test_x, test_y, seed, settings, device) -> rows
    # on_run:      (run, data, seed, settings, device, progress) -> (rows, number of test images)
    compute: Callable[..., Any]
    metrics: tuple[Metric, ...]
    on_run: bool = False


EVALUATORS: Registry[Evaluator] = Registry("evaluator")
EVAL_ALL = ("linear", "fewshot", "knn")  # `eval all`; the paper's LARS probes are asked for by name
FEATURE_EXTRACTOR = "mage-probe"  # the run's own encoder, official probe feature


def _linear(train_x, train_y, test_x, test_y, seed: int, settings: EvalConfig, device: str) -> list[Row]:
    r = linear.linear_probe(train_x, train_y, test_x, test_y, seed=seed)
    extra = {"C": r["C"], "val_top1": r["val_top1"]}
    return [("top1", r["top1"], extra), ("top5", r["top5"], extra)]


def _mae_rows(result: dict[str, Any], protocol: str, augment: str, test_view: str) -> list[Row]:
    """Rows of a paper-protocol probe; `protocol` keeps mae and mae-cached numbers apart in reports."""
    extra = {"protocol": protocol, "augment": augment, "test_view": test_view,
             **{k: result[k] for k in ("lr", "epochs", "warmup_epochs", "batch_size")}}
    return [("top1", result["top1"], extra), ("top5", result["top5"], extra)]


def _linear_mae_cached(train_x, train_y, test_x, test_y, seed: int, settings: EvalConfig, device: str) -> list[Row]:
    from mage_bench.eval.features import TRANSFORM

    r = linear.linear_probe_mae(train_x, train_y, test_x, test_y, seed=seed, device=device,
                                **settings.probe_schedule())
    # The cached features are one deterministic view per image, the same for training and test.
    return _mae_rows(r, "mae-cached", augment="none", test_view=TRANSFORM)


def _linear_mae(run: Any, data: DataConfig, seed: int, settings: EvalConfig, device: str,
                progress: bool) -> tuple[list[Row], int]:
    r = linear_views.linear_probe_mae_views(run, data, seed=seed, device=device, progress=progress,
                                            **settings.probe_schedule())
    return _mae_rows(r, "mae", augment=r["augment"], test_view=r["test_view"]), r["n_test"]


def _fewshot(train_x, train_y, test_x, test_y, seed: int, settings: EvalConfig, device: str) -> list[Row]:
    results = fewshot.few_shot(train_x, train_y, test_x, test_y, shots=settings.fewshot_shots,
                               draws=settings.fewshot_draws, seed=seed)
    return [("top1", r["mean"], {"shots": shots, "std": r["std"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                                 "draws": r["draws"]}) for shots, r in results.items()]


def _knn(train_x, train_y, test_x, test_y, seed: int, settings: EvalConfig, device: str) -> list[Row]:
    rows: list[Row] = []
    for k in settings.knn_ks:
        r = knn.knn_classify(train_x, train_y, test_x, test_y, k=k, temperature=settings.knn_temperature)
        extra = {"k": r["k"], "temperature": settings.knn_temperature}
        rows += [("top1", r["top1"], extra), ("top5", r["top5"], extra)]
    # Retrieval: test images as queries against the train split, same class = relevant.
    r = knn.retrieval_metrics(train_x, train_y, test_x, test_y, precision_ks=(10,))
    rows += [("map_at_r", r["map_at_r"], {"queries": r["queries"]}), ("precision_at_10", r["precision_at_10"], {})]
    return rows


EVALUATORS.register("linear")(Evaluator(_linear, linear.METRICS))
EVALUATORS.register("linear-mae-cached")(Evaluator(_linear_mae_cached, linear_views.PROBE_METRICS))
EVALUATORS.register("linear-mae")(Evaluator(_linear_mae, linear_views.PROBE_METRICS, on_run=True))
EVALUATORS.register("fewshot")(Evaluator(_fewshot, fewshot.METRICS))
EVALUATORS.register("knn")(Evaluator(_knn, knn.METRICS))


def metric_of(evaluator: str, key: str) -> Metric:
    """The declaration of an evaluator's metric (generation metrics included), e.g. for labels."""
    from mage_bench.eval.fid_backends import METRICS as GENERATION_METRICS
    from mage_bench.eval.generation import EVALUATOR as GENERATION
    from mage_bench.metrics import declared

    metrics = GENERATION_METRICS if evaluator == GENERATION else EVALUATORS.get(evaluator).metrics
    return declared(metrics, key, evaluator)


def run_data_config(config: Any, name: str | None = None) -> DataConfig:
    """A run config's data settings, optionally pointed at another data set of that layout."""
    import dataclasses

    return dataclasses.replace(config.data, name=name) if name else config.data


def check_evaluator(name: str) -> None:
    """A `UserError` naming the choices unless `name` is a registered evaluator."""
    if name not in EVALUATORS:
        raise UserError(f"unknown evaluator {name!r}{did_you_mean(name, EVALUATORS.names())}; "
                        f"choose one of: {', '.join(EVALUATORS.names())}")


def evaluate_run(run_dir: str | Path | Any, names: list[str], settings: EvalConfig = DEFAULT_EVAL,
                 data_name: str | None = None, progress: bool = False, cache_dir: str | Path | None = None,
                 sweep: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """Run the named evaluators on the run's cached features (or on the run, for `on_run` ones); write
    and return their records.

    The run is loaded once; its own data settings apply, `data_name` only swaps the data set.
    Features are cached under RUN/eval/cache unless `cache_dir` says otherwise, and extracted only
    when an evaluator on features is asked for.
    """
    from mage_bench.results import RecordContext, build_records, config_hash, write_records
    from mage_bench.runs import EVAL_DIR, LoadedRun, load_run, resolve_device

    names = list(dict.fromkeys(names))  # asked twice, run once
    for name in names:
        check_evaluator(name)  # typos fail before any work
    device = resolve_device(settings.device)
    run = run_dir if isinstance(run_dir, LoadedRun) else load_run(run_dir, device)
    config, data = run.config, run_data_config(run.config, data_name)
    features = None
    if any(not EVALUATORS.get(name).on_run for name in names):
        features = _cached_features(run, data, device, cache_dir, progress)
    written = {}
    for name in names:
        evaluator = EVALUATORS.get(name)
        if evaluator.on_run:
            rows, n_test = evaluator.compute(run, data, config.seed, settings, device, progress)
        else:
            rows, n_test = evaluator.compute(*features, config.seed, settings, device), len(features[3])
        context = RecordContext(evaluator=name, run=run.path.name, dataset=data.name, split="test",
                                feature_extractor=FEATURE_EXTRACTOR, n_samples=n_test, seed=config.seed,
                                config_hash=config_hash(config), sweep=sweep)
        records = build_records(context, evaluator.metrics, rows)
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
# Everything at once


def evaluate_all(run_dir: str | Path | Any, settings: EvalConfig = DEFAULT_EVAL, data_name: str | None = None,
                 flags: tuple[str, ...] = ("fid", "isc", "kid"), cache_dir: str | Path | None = None,
                 progress: bool = False, sweep: str | None = None,
                 samples: Any | None = None) -> dict[str, list[dict[str, Any]]]:
    """One load and one feature pass for linear, few-shot and kNN, then FID (+IS/KID) of the run's samples.

    `run_dir` is a run folder or a `LoadedRun`. `settings.num_samples` defaults to the number of
    reference images (the real split of the run's data set), so both sides of the Fréchet distance have
    the same count; `samples` passes images generated already (an `ImageSet` of that many).
    Writes RUN/eval/{linear,fewshot,knn,fid}.json.
    """
    import dataclasses

    from mage_bench.eval.generation import evaluate_generation
    from mage_bench.runs import LoadedRun, load_run, resolve_device

    run = run_dir if isinstance(run_dir, LoadedRun) else load_run(run_dir, resolve_device(settings.device))
    data = run_data_config(run.config, data_name)
    settings = dataclasses.replace(settings, num_samples=num_samples_for(run, settings, data_name))
    written = evaluate_run(run, list(EVAL_ALL), settings, data_name=data_name, progress=progress, sweep=sweep)
    written["fid"] = evaluate_generation(run, data.name, settings, flags, cache_dir=cache_dir, progress=progress,
                                         sweep=sweep, samples=samples)
    return written


def num_samples_for(run: Any, settings: EvalConfig, data_name: str | None = None) -> int:
    """The images to generate from `run`: the setting, or as many as the reference split holds."""
    from mage_bench.data import create_dataset

    if settings.num_samples is not None:
        return settings.num_samples
    data = run_data_config(run.config, data_name)
    return len(create_dataset(data, settings.real_split, train_transform=False))
