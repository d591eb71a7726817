"""Representation evaluators wired to runs: one feature pass (cached), then any of the evaluators.

`EVALUATORS` is the registry. Each entry declares its metrics (`mage_bench.metrics.Metric`, next to its
code) and computes rows (metric key, value, evaluator-specific fields) either on cached features
(train_x, train_y, test_x, test_y) or, for `on_run` entries, on the run itself (the faithful linear
probe feeds fresh augmented views through the encoder every epoch). Every setting comes from one
`EvalConfig`. `evaluate_run` builds the rows into result records (`results.build_records`) and writes
them to RUN/eval/NAME.json; `evaluate_all` adds the generation metrics (`eval/generation.py`).

Resuming (`resume=True`): what a records file was computed from is kept beside it (`eval/inputs.py`); an
evaluator whose records and matching inputs exist is not run again, its records are read back.
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
from mage_bench.eval.features import OFFICIAL_POOLING
from mage_bench.eval.inputs import (  # noqa: F401  (run_data_config and dataset_identities: re-exported)
    dataset_identities,
    evaluation_datasets,
    evaluation_inputs,
    identities_of,
    inputs_match,
    records_path,
    remember_inputs,
    run_data_config,
)
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
    settings: tuple[str, ...] = ()  # the EvalConfig fields its numbers depend on (what `resume` compares)


EVALUATORS: Registry[Evaluator] = Registry("evaluator")
EVAL_ALL = ("linear", "fewshot", "knn")  # `eval all`; the paper's LARS probes are asked for by name
FEATURE_EXTRACTOR = "mage-probe"  # the run's own encoder, official probe feature
# The EvalConfig fields the generation records depend on (with the metric flags), for `evaluate_all`'s resume.
GENERATION_SETTINGS = ("num_samples", "real_split", "extractor", "weights", "backend")


def _linear(train_x, train_y, test_x, test_y, seed: int, settings: EvalConfig, device: str) -> list[Row]:
    r = linear.linear_probe(train_x, train_y, test_x, test_y, seed=seed, device=device)
    extra = {"C": r["C"], "val_top1": r["val_top1"], "solver": r["solver"]}
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
                                            encode_batch=settings.feature_batch_size(data.image_size),
                                            **settings.probe_schedule())
    return _mae_rows(r, "mae", augment=r["augment"], test_view=r["test_view"]), r["n_test"]


def _fewshot(train_x, train_y, test_x, test_y, seed: int, settings: EvalConfig, device: str) -> list[Row]:
    results = fewshot.few_shot(train_x, train_y, test_x, test_y, shots=settings.fewshot_shots,
                               draws=settings.fewshot_draws, seed=seed)
    return [("top1", r["mean"], {"shots": shots, "std": r["std"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                                 "draws": r["draws"]}) for shots, r in results.items()]


def _knn(train_x, train_y, test_x, test_y, seed: int, settings: EvalConfig, device: str) -> list[Row]:
    # One search serves every k and the retrieval (test images as queries against the train split, same
    # class = relevant).
    results, r = knn.knn_evaluate(train_x, train_y, test_x, test_y, ks=settings.knn_ks,
                                  temperature=settings.knn_temperature, precision_ks=(10,), device=device)
    rows: list[Row] = []
    for result in results:
        extra = {"k": result["k"], "temperature": settings.knn_temperature}
        rows += [("top1", result["top1"], extra), ("top5", result["top5"], extra)]
    rows += [("map_at_r", r["map_at_r"], {"queries": r["queries"]}), ("precision_at_10", r["precision_at_10"], {})]
    return rows


PROBE_SETTINGS = ("probe_epochs", "probe_batch_size", "probe_blr")
FEATURE_SETTINGS = ("layers", "pooling")  # what every evaluator on cached features also depends on
EVALUATORS.register("linear")(Evaluator(_linear, linear.METRICS))
EVALUATORS.register("linear-mae-cached")(Evaluator(_linear_mae_cached, linear_views.PROBE_METRICS,
                                                   settings=PROBE_SETTINGS))
EVALUATORS.register("linear-mae")(Evaluator(_linear_mae, linear_views.PROBE_METRICS, on_run=True,
                                            settings=PROBE_SETTINGS))
EVALUATORS.register("fewshot")(Evaluator(_fewshot, fewshot.METRICS, settings=("fewshot_shots", "fewshot_draws")))
EVALUATORS.register("knn")(Evaluator(_knn, knn.METRICS, settings=("knn_ks", "knn_temperature")))


def metric_of(evaluator: str, key: str) -> Metric:
    """The declaration of an evaluator's metric (generation metrics included), e.g. for labels."""
    from mage_bench.eval import finetune, inpaint
    from mage_bench.eval.fid_backends import METRICS as GENERATION_METRICS
    from mage_bench.eval.generation import EVALUATOR as GENERATION
    from mage_bench.metrics import declared

    # The evaluators on generated or completed images, and fine-tuning, keep their own wiring (not on features).
    own = {GENERATION: GENERATION_METRICS, inpaint.EVALUATOR: inpaint.METRICS, finetune.EVALUATOR: finetune.METRICS}
    metrics = own[evaluator] if evaluator in own else EVALUATORS.get(evaluator).metrics
    return declared(metrics, key, evaluator)


def check_evaluator(name: str) -> None:
    """A `UserError` naming the choices unless `name` is a registered evaluator."""
    if name not in EVALUATORS:
        raise UserError(f"unknown evaluator {name!r}{did_you_mean(name, EVALUATORS.names())}; "
                        f"choose one of: {', '.join(EVALUATORS.names())}")


def evaluate_run(run_dir: str | Path | Any, names: list[str], settings: EvalConfig = DEFAULT_EVAL,
                 data_name: str | None = None, progress: bool = False, cache_dir: str | Path | None = None,
                 sweep: str | None = None, resume: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Run the named evaluators on the run's cached features (or on the run, for `on_run` ones); write
    and return their records.

    The run is loaded once; its own data settings apply, `data_name` only swaps the data set.
    Features are cached under RUN/eval/cache unless `cache_dir` says otherwise, and extracted only
    when an evaluator on features is computed, `settings.feature_batch_size` images at a time.
    `resume`: an evaluator whose records exist and were computed from the same inputs (module doc) is
    not run again; its records are read back.
    """
    from mage_bench.results import RecordContext, build_records, config_hash, read_records, write_records
    from mage_bench.runs import LoadedRun, load_run, resolve_device

    names = list(dict.fromkeys(names))  # asked twice, run once
    for name in names:
        check_evaluator(name)  # typos fail before any work
    device = resolve_device(settings.device)
    run = run_dir if isinstance(run_dir, LoadedRun) else load_run(run_dir, device)
    config, data = run.config, run_data_config(run.config, data_name)
    depth = config.model.depth
    views = settings.feature_views(depth)  # (block, pooling) pairs; a block beyond the encoder fails here
    official = (depth - 1, OFFICIAL_POOLING)
    on_run = [name for name in names if EVALUATORS.get(name).on_run]
    if on_run and views != [official]:
        raise UserError(f"--layers/--pooling choose cached features; {on_run[0]} probes the official feature on "
                        "fresh views (use --protocol mae-cached for other layers)")
    run_hash = config_hash(config)
    datasets = evaluation_datasets(data, ("train", "test"))  # listed once: identities and features share them
    identities = identities_of(datasets)
    inputs = {name: evaluation_inputs(run, name, data, identities, settings, sweep, run_hash,
                                      EVALUATORS.get(name).settings + (() if name in on_run else FEATURE_SETTINGS))
              for name in names}
    written = {name: read_records(records_path(run, name)) for name in names
               if resume and inputs_match(run, name, inputs[name])}
    todo = [name for name in names if name not in written]
    features = None
    if any(name not in on_run for name in todo):
        features = _cached_features(run, data, datasets, views, device, cache_dir, progress,
                                    settings.feature_batch_size(data.image_size))
    for name in todo:
        evaluator = EVALUATORS.get(name)
        if evaluator.on_run:
            rows, n_test = evaluator.compute(run, data, config.seed, settings, device, progress)
            rows = [(key, value, {**extra, **_view_fields(official, depth)}) for key, value, extra in rows]
        else:
            rows = []
            for view in views:  # every record says which block and pooling its feature came from
                train_x, train_y, test_x, test_y = features[view]
                rows += [(key, value, {**extra, **_view_fields(view, depth)}) for key, value, extra
                         in evaluator.compute(train_x, train_y, test_x, test_y, config.seed, settings, device)]
            n_test = len(test_y)
        context = RecordContext(evaluator=name, run=run.path.name, dataset=data.name, split="test",
                                feature_extractor=FEATURE_EXTRACTOR, n_samples=n_test, seed=config.seed,
                                config_hash=run_hash, sweep=sweep)
        records = build_records(context, evaluator.metrics, rows)
        write_records(records_path(run, name), records)
        remember_inputs(run, name, inputs[name])  # after the records: inputs only ever describe records
        written[name] = [r.as_dict() for r in records]
    return {name: written[name] for name in names}


def _view_fields(view: tuple[int, str], depth: int) -> dict[str, Any]:
    """What a probe record says of its feature: the block (0-based; the last is depth - 1) and the pooling."""
    return {"layer": view[0], "pooling": view[1], "depth": depth}


def _cached_features(run: Any, data: DataConfig, datasets: dict[str, Any], views: list[tuple[int, str]], device: str,
                     cache_dir: str | Path | None, progress: bool,
                     batch_size: int | None = None) -> dict[tuple[int, str], tuple[Any, Any, Any, Any]]:
    """{view: (train_x, train_y, test_x, test_y)} of the run's probe features, from the cache when present;
    the views missing from it are extracted in one pass per split."""
    from mage_bench.eval.features import extract_views

    out: dict[str, Any] = {}
    for split in ("train", "test"):
        out[split] = extract_views(run, data, split, views, batch_size=batch_size, device=device,
                                   cache_dir=cache_dir, progress=progress, dataset=datasets[split])
    (train, train_y, _), (test, test_y, _) = out["train"], out["test"]
    return {view: (np.asarray(train[view]), train_y, np.asarray(test[view]), test_y) for view in views}


# --------------------------------------------------------------------------------------------
# Everything at once


def evaluate_all(run_dir: str | Path | Any, settings: EvalConfig = DEFAULT_EVAL, data_name: str | None = None,
                 flags: tuple[str, ...] = ("fid", "isc", "kid"), cache_dir: str | Path | None = None,
                 progress: bool = False, sweep: str | None = None, samples: Any | None = None,
                 resume: bool = False) -> dict[str, list[dict[str, Any]]]:
    """One load and one feature pass for linear, few-shot and kNN, then FID (+IS/KID) of the run's samples.

    `run_dir` is a run folder or a `LoadedRun`. `settings.num_samples` defaults to the number of
    reference images (the real split of the run's data set), so both sides of the Fréchet distance have
    the same count; `samples` passes images generated already (an `ImageSet` of that many).
    Writes RUN/eval/{linear,fewshot,knn,fid}.json, RUN/eval/inpaint.json when `settings.inpaint` names
    masks, and RUN/eval/finetune.json (after fine-tuning into RUN/finetune/) when `settings.finetune` names
    a preset. `resume`: evaluators (fid and inpaint included) whose records exist and were computed from the
    same inputs are read back, not recomputed (module doc).
    """
    import dataclasses

    from mage_bench.runs import LoadedRun, load_run, resolve_device

    if settings.profile is not None:  # a profile `eval all` cannot follow, or a bad grid, fails before any work
        profile_for_runs(settings.profile)
    if settings.decode_grid:
        from mage_bench.eval.decode_grid import parse_decode

        parse_decode(settings.decode_grid)
    if settings.finetune:  # its refusals before the other evaluators' work, not after
        from mage_bench.eval.finetune import preflight

        preflight(run_dir.path if isinstance(run_dir, LoadedRun) else run_dir, settings.finetune, resume)
    run = run_dir if isinstance(run_dir, LoadedRun) else load_run(run_dir, resolve_device(settings.device))
    data = run_data_config(run.config, data_name)
    if settings.profile is None:
        settings = dataclasses.replace(settings, num_samples=num_samples_for(run, settings, data_name))
    written = evaluate_run(run, list(EVAL_ALL), settings, data_name=data_name, progress=progress, sweep=sweep,
                           resume=resume)
    if settings.profile is not None:
        written.update(_evaluate_profile(run, settings, data, data_name, cache_dir, progress, sweep, resume))
    else:
        written.update(_evaluate_generation(run, settings, data, flags, cache_dir, progress, sweep, samples, resume))
    if settings.inpaint:  # masked reconstruction, when the settings (a sweep's eval.inpaint) ask for it
        from mage_bench.eval.inpaint import EVALUATOR as INPAINT
        from mage_bench.eval.inpaint import evaluate_inpainting

        written[INPAINT] = evaluate_inpainting(run, settings, data_name=data_name, cache_dir=cache_dir,
                                               progress=progress, sweep=sweep, resume=resume)
    if settings.finetune:  # end-to-end fine-tuning, when the settings (a sweep's eval.finetune) ask for it
        from mage_bench.eval.finetune import EVALUATOR as FINETUNE
        from mage_bench.eval.finetune import finetune_run

        written[FINETUNE] = finetune_run(run.path, preset=settings.finetune, resume=resume, progress=progress,
                                         device=settings.device, sweep=sweep, steps=settings.finetune_steps)
    return written


def _evaluate_generation(run: Any, settings: EvalConfig, data: DataConfig, flags: tuple[str, ...],
                         cache_dir: str | Path | None, progress: bool, sweep: str | None, samples: Any | None,
                         resume: bool) -> dict[str, list[dict[str, Any]]]:
    """RUN/eval/fid.json: the generation metrics with the settings' extractor and backend (no profile)."""
    from mage_bench.eval import generation
    from mage_bench.results import config_hash

    name = generation.EVALUATOR
    inputs = evaluation_inputs(run, name, data, dataset_identities(data, (settings.real_split,)), settings, sweep,
                               config_hash(run.config), GENERATION_SETTINGS, flags=list(dict.fromkeys(flags)))
    return {name: _read_back_or_compute(run, name, inputs, resume, lambda: generation.evaluate_generation(
        run, data.name, settings, flags, cache_dir=cache_dir, progress=progress, sweep=sweep, samples=samples))}


def _read_back_or_compute(run: Any, name: str, inputs: dict[str, Any], resume: bool,
                          compute: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Evaluator `name`'s records: read back when resuming with the inputs they were made from, else
    `compute`d and their inputs remembered (after the records: inputs only ever describe records)."""
    from mage_bench.results import read_records

    if resume and inputs_match(run, name, inputs):
        return read_records(records_path(run, name))
    records = compute()
    remember_inputs(run, name, inputs)
    return records


def _evaluate_profile(run: Any, settings: EvalConfig, data: DataConfig, data_name: str | None,
                      cache_dir: str | Path | None, progress: bool, sweep: str | None,
                      resume: bool) -> dict[str, list[dict[str, Any]]]:
    """RUN/eval/fid-<profile>.json: the generation metrics under the settings' evaluation profile."""
    from mage_bench.eval.profile_eval import check_weights, evaluate_profile, records_name
    from mage_bench.results import config_hash

    profile = profile_for_runs(settings.profile)
    name = records_name(profile)
    split = (profile.real_split,)
    # The weights by content: a replaced file (an unpinned profile's) must not let old records be read back
    _, weights_sha256 = check_weights(profile, settings.weights, allow_download=True, progress=progress)
    inputs = evaluation_inputs(run, name, data, dataset_identities(data, split), settings, sweep,
                               config_hash(run.config), ("weights",), profile=profile.describe(),
                               weights_sha256=weights_sha256)
    written = {name: _read_back_or_compute(run, name, inputs, resume, lambda: evaluate_profile(
        run, data.name, profile, weights=settings.weights, device=settings.device, cache_dir=cache_dir,
        progress=progress, sweep=sweep, stream=settings.stream_samples))}
    if settings.decode_grid:  # the decoding sweep under the same profile, apart from its headline records
        from mage_bench.eval import decode_grid

        grid = decode_grid.parse_decode(settings.decode_grid)
        name = decode_grid.records_name(profile)
        inputs = evaluation_inputs(run, name, data, dataset_identities(data, split), settings, sweep,
                                   config_hash(run.config), ("weights", "decode_grid"), profile=profile.describe(),
                                   weights_sha256=weights_sha256)
        written[name] = _read_back_or_compute(run, name, inputs, resume, lambda: decode_grid.evaluate_decode_grid(
            run, data.name, profile, grid, weights=settings.weights, device=settings.device, cache_dir=cache_dir,
            progress=progress, sweep=sweep, stream=settings.stream_samples))
    return written


def profile_for_runs(name: str) -> Any:
    """The profile `eval all` and sweeps evaluate runs under: one whose reference is a data set (they have no
    --real); a `UserError` otherwise."""
    from mage_bench.eval.profiles import load_profile

    profile = load_profile(name)
    if profile.reference != "dataset":
        raise UserError(f"profile {profile.name} compares against a {profile.reference} given with --real, but "
                        "`eval all` and sweeps evaluate against the run's data set: use `eval fid --profile "
                        f"{profile.name} --real ... --fake RUN`, or a profile with reference: dataset")
    return profile


def num_samples_for(run: Any, settings: EvalConfig, data_name: str | None = None) -> int:
    """The images to generate from `run`: the setting, or as many as the reference split holds."""
    from mage_bench.data import create_dataset

    if settings.num_samples is not None:
        return settings.num_samples
    data = run_data_config(run.config, data_name)
    return len(create_dataset(data, settings.real_split, train_transform=False))
