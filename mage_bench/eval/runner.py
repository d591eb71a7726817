"""Representation evaluators wired to runs: one feature pass (cached), then any of the evaluators.

`EVALUATORS` is the registry; each entry maps (train_x, train_y, test_x, test_y, seed) to rows of
(metric, value, higher_is_better, evaluator-specific fields). `evaluate_run` writes the rows as
result records to RUN/eval/NAME.json.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mage_bench.config import DataConfig
from mage_bench.registry import Registry

Row = tuple[str, float, bool, dict[str, Any]]
Evaluator = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int], list[Row]]
EVALUATORS: Registry[Evaluator] = Registry("evaluator")
KNN_KS = (10, 20, 100, 200)
FEATURE_EXTRACTOR = "mage-probe"  # the run's own encoder, official probe feature


@EVALUATORS.register("linear")
def _linear(train_x, train_y, test_x, test_y, seed: int) -> list[Row]:
    from mage_bench.eval.linear import linear_probe

    r = linear_probe(train_x, train_y, test_x, test_y, seed=seed)
    extra = {"C": r["C"], "val_top1": r["val_top1"]}
    return [("top1", r["top1"], True, extra), ("top5", r["top5"], True, extra)]


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
    from mage_bench.eval.knn import knn_classify

    rows = []
    for k in KNN_KS:
        r = knn_classify(train_x, train_y, test_x, test_y, k=k, temperature=0.07)
        extra = {"k": r["k"], "temperature": 0.07}
        rows += [("top1", r["top1"], True, extra), ("top5", r["top5"], True, extra)]
    return rows


def run_data_config(config: Any, name: str | None = None) -> DataConfig:
    """A run config's data settings, optionally pointed at another data set of that layout."""
    import dataclasses

    return dataclasses.replace(config.data, name=name) if name else config.data


def evaluate_run(run_dir: str | Path, names: list[str], data_name: str | None = None, progress: bool = False,
                 device: str = "cpu") -> dict[str, list[dict[str, Any]]]:
    """Run the named evaluators on the run's cached features; write and return their records.

    The run is loaded once; its own data settings apply, `data_name` only swaps the data set.
    """
    from mage_bench.eval.features import extract_features
    from mage_bench.results import ResultRecord, config_hash, write_records
    from mage_bench.runs import EVAL_DIR, load_run

    evaluators = {name: EVALUATORS.get(name) for name in names}  # typos fail before any work
    run = load_run(run_dir, device)
    config, data = run.config, run_data_config(run.config, data_name)
    train_x, train_y, _ = extract_features(run, data, "train", device=device, progress=progress)
    test_x, test_y, _ = extract_features(run, data, "test", device=device, progress=progress)
    written = {}
    for name, evaluate in evaluators.items():
        records = [ResultRecord(sweep=None, run=run.path.name, evaluator=name, metric=metric, value=float(value),
                                higher_is_better=better, n_samples=int(len(test_y)), dataset=data.name,
                                split="test", feature_extractor=FEATURE_EXTRACTOR, seed=config.seed,
                                config_hash=config_hash(config), extra=extra)
                   for metric, value, better, extra in evaluate(np.asarray(train_x), train_y, np.asarray(test_x),
                                                                test_y, config.seed)]
        write_records(run.path / EVAL_DIR / f"{name}.json", records)
        written[name] = [r.as_dict() for r in records]
    return written
