"""Tests generated from every registry of an extensible axis: each new entry is checked on its own.

Evaluators, FID backends, FID feature extractors and executors: adding one to its registry adds its
cases here, so an entry that does not keep the axis's contract fails by name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mage_bench.config import EvalConfig
from mage_bench.errors import UserError
from mage_bench.eval.extractors import FID_EXTRACTORS, standard_extractors
from mage_bench.eval.fid_backends import BACKENDS, FLAGS
from mage_bench.eval.fid_backends import METRICS as GENERATION_METRICS
from mage_bench.eval.runner import EVALUATORS, metric_of
from mage_bench.executors import EXECUTORS
from mage_bench.results import RecordContext, build_records

SMALL = EvalConfig(knn_ks=(3,), fewshot_shots=(1, 2), fewshot_draws=2, probe_epochs=2, probe_batch_size=16,
                   device="cpu")


def _features(seed: int = 0) -> tuple[np.ndarray, ...]:
    """Three well separated classes of 8-d features: 30 train, 15 test rows."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((3, 8)) * 4
    train_y, test_y = np.repeat(np.arange(3), 10), np.repeat(np.arange(3), 5)
    return (centres[train_y] + rng.standard_normal((30, 8)), train_y,
            centres[test_y] + rng.standard_normal((15, 8)), test_y)


@pytest.mark.parametrize("name", EVALUATORS.names())
def test_every_evaluator_declares_distinct_metrics(name):
    metrics = EVALUATORS.get(name).metrics
    keys = [m.key for m in metrics]
    assert keys and len(set(keys)) == len(keys)
    assert all(m.label and isinstance(m.higher_is_better, bool) for m in metrics)
    assert all(metric_of(name, key).key == key for key in keys)


@pytest.mark.parametrize("name", [n for n in EVALUATORS.names() if not EVALUATORS.get(n).on_run])
def test_every_feature_evaluator_produces_only_declared_metrics(name):
    evaluator = EVALUATORS.get(name)
    rows = evaluator.compute(*_features(), 0, SMALL, "cpu")
    context = RecordContext(evaluator=name, run="r", dataset="d", split="test", feature_extractor="f",
                            n_samples=15, seed=0, config_hash=None)
    records = build_records(context, evaluator.metrics, rows)  # raises on an undeclared metric
    assert {r.metric for r in records} == {m.key for m in evaluator.metrics}
    assert all(np.isfinite(r.value) for r in records)
    declared = {m.key: m.higher_is_better for m in evaluator.metrics}
    assert all(r.higher_is_better == declared[r.metric] for r in records)


def test_an_undeclared_metric_is_refused():
    context = RecordContext(evaluator="knn", run="r", dataset="d", split="test", feature_extractor="f",
                            n_samples=1, seed=0, config_hash=None)
    with pytest.raises(KeyError, match="does not declare"):
        build_records(context, EVALUATORS.get("knn").metrics, [("top7", 0.5, {})])


def test_settings_reach_the_evaluators():
    """kNN k and temperature, few-shot shots and draws come from the EvalConfig."""
    rows = EVALUATORS.get("knn").compute(*_features(), 0, EvalConfig(knn_ks=(2, 5), knn_temperature=0.5), "cpu")
    assert {(r[2].get("k"), r[2].get("temperature")) for r in rows if r[0] == "top1"} == {(2, 0.5), (5, 0.5)}
    rows = EVALUATORS.get("fewshot").compute(*_features(), 0, EvalConfig(fewshot_shots=(3,), fewshot_draws=4), "cpu")
    assert [(r[2]["shots"], r[2]["draws"]) for r in rows] == [(3, 4)]


def test_generation_metrics_are_declared_for_every_flag():
    from mage_bench.eval.profiles import PROFILE_METRICS

    keys = {m.key for m in GENERATION_METRICS}
    # Every record a metric flag or an evaluation profile produces is declared, and nothing else is.
    assert {key for produced in FLAGS.values() for key in produced} | set(PROFILE_METRICS) == keys


@pytest.fixture(scope="module")
def two_folders(tmp_path_factory):
    """Two folders of 12 random 16 px images each."""
    rng = np.random.default_rng(0)
    folders = []
    for side in ("a", "b"):
        folder = tmp_path_factory.mktemp(side)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
        folders.append(folder)
    return folders


@pytest.mark.parametrize("backend", BACKENDS.names())
def test_every_backend_computes_fid_and_refuses_what_it_cannot(backend, two_folders, digits_cnn, tmp_path):
    from mage_bench.eval.generation import evaluate_generation

    settings = EvalConfig(backend=backend, extractor="digits-cnn", weights=str(digits_cnn[0]), device="cpu")
    records = evaluate_generation(two_folders[0], str(two_folders[1]), settings, ("fid",), cache_dir=tmp_path)
    assert [r["metric"] for r in records] == ["fid"] and np.isfinite(records[0]["value"]) and records[0]["value"] > 0
    assert records[0]["backend"] == backend and records[0]["higher_is_better"] is False
    unsupported = sorted(set(FLAGS) - BACKENDS.get(backend).metrics)
    if unsupported:
        with pytest.raises(UserError, match=f"{backend} computes"):
            evaluate_generation(two_folders[0], str(two_folders[1]), settings, ("fid", unsupported[0]),
                                cache_dir=tmp_path)


@pytest.mark.parametrize("name", FID_EXTRACTORS.names())
def test_every_extractor_names_itself_and_refuses_missing_weights(name, tmp_path):
    extractor = FID_EXTRACTORS.get(name)
    assert extractor.name == name and isinstance(extractor.standard, bool)
    missing = tmp_path / "no-such-weights.pth"
    with pytest.raises(UserError, match=str(missing)):
        extractor.resolve_weights(str(missing), False)
    label = metric_of("fid", "fid").display({name}, standard=name in standard_extractors())
    assert (label == "FID") == extractor.standard and (name in label) != extractor.standard


@pytest.mark.parametrize("name", EXECUTORS.names())
def test_every_executor_is_documented_and_dry_runs(name, capsys):
    from mage_bench.cli import build_parser, main

    sweep_help = next(a for a in build_parser()._subparsers._group_actions[0].choices["sweep"]._actions
                      if "--executor" in a.option_strings).help
    assert name in sweep_help
    assert f"`{name}`" in (Path(__file__).resolve().parents[1] / "mage_bench" / "executors.py").read_text()
    assert main(["sweep", "masking", "--executor", name, "--dry-run", "--runs", "/nonexistent/runs"]) == 0
    assert f"with the {name} executor" in capsys.readouterr().out
