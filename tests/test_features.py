import json

import numpy as np
import pytest

from mage_bench.config import DataConfig, RunConfig, resolve_config
from mage_bench.errors import UserError
from mage_bench.eval.features import extract_features
from mage_bench.io import atomic_torch_save, safe_torch_load
from mage_bench.results import REQUIRED, ResultRecord, config_hash, read_records, write_records
from mage_bench.train import train


@pytest.fixture
def run(tmp_path, tiny_run_layer):
    train(resolve_config(RunConfig, tiny_run_layer), tmp_path / "run", progress=False)
    return tmp_path / "run"


def test_features_are_batch_size_invariant(run, tmp_path):
    data = DataConfig()
    one, labels_one, _ = extract_features(run, data, "test", batch_size=1, cache_dir=tmp_path / "c1")
    many, labels_many, _ = extract_features(run, data, "test", batch_size=64, cache_dir=tmp_path / "c64")
    assert one.shape == (360, 32) and one.dtype == np.float32
    assert np.abs(np.asarray(one) - np.asarray(many)).max() < 1e-5
    assert np.array_equal(labels_one, labels_many)


def test_cache_is_hit_then_invalidated_by_a_new_checkpoint(run):
    data = DataConfig()
    first, _, info = extract_features(run, data, "test")
    again, _, info_again = extract_features(run, data, "test")
    assert not info["cached"] and info_again["cached"] and np.array_equal(first, again)
    state = safe_torch_load(run / "checkpoint.pt")
    state["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()}
    atomic_torch_save(state, run / "checkpoint.pt")
    changed, _, info_changed = extract_features(run, data, "test")
    assert not info_changed["cached"] and info_changed["cache_key"] != info["cache_key"]
    assert not np.allclose(changed, first)
    assert len(list((run / "eval" / "cache").glob("features-*.json"))) == 2


def test_result_records_round_trip(tmp_path, tiny_run_layer):
    cfg = resolve_config(RunConfig, tiny_run_layer)
    record = ResultRecord(sweep=None, run="r", evaluator="knn", metric="top1", value=0.9, higher_is_better=True,
                          n_samples=360, dataset="digits", split="test", feature_extractor="mage", seed=0,
                          config_hash=config_hash(cfg), extra={"k": 20})
    write_records(tmp_path / "eval" / "knn.json", [record])
    (loaded,) = read_records(tmp_path / "eval" / "knn.json")
    assert set(REQUIRED) <= set(loaded) and loaded["k"] == 20 and loaded["value"] == 0.9
    assert config_hash(cfg) == config_hash(resolve_config(RunConfig, tiny_run_layer))
    (tmp_path / "bad.json").write_text(json.dumps([{"run": "r"}]))
    with pytest.raises(UserError, match="record 0 lacks sweep"):
        read_records(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="clash"):
        ResultRecord(**{**record.__dict__, "extra": {"value": 1}}).as_dict()


def test_cli_eval_knn_linear_fewshot_write_records(run, capsys):
    from mage_bench.cli import main

    for name in ("knn", "linear", "fewshot"):
        assert main(["eval", name, "--run", str(run), "--data", "digits", "--json", "--quiet"]) == 0
        printed = json.loads(capsys.readouterr().out)
        stored = read_records(run / "eval" / f"{name}.json")
        assert printed == stored and all(r["feature_extractor"] == "mage-probe" for r in stored)
        assert all(r["n_samples"] == 360 and r["split"] == "test" for r in stored)
    knn = read_records(run / "eval" / "knn.json")
    assert sorted({r["k"] for r in knn if r["metric"] in ("top1", "top5")}) == [10, 20, 100, 200]
    assert {"map_at_r", "precision_at_10"} <= {r["metric"] for r in knn}
    fewshot = read_records(run / "eval" / "fewshot.json")
    assert sorted(r["shots"] for r in fewshot) == [1, 2, 5, 10] and all("ci_low" in r for r in fewshot)
    # One feature pass: the second and third evaluators reused the cached features.
    assert len(list((run / "eval" / "cache").glob("features-*.json"))) == 2
    assert main(["eval", "knn"]) == 2
    assert "needs --run" in capsys.readouterr().err


def test_eval_uses_the_runs_data_settings(run):
    from mage_bench.eval.runner import run_data_config
    from mage_bench.runs import load_run

    config = load_run(run).config
    assert run_data_config(config) == DataConfig()
    assert run_data_config(config, "imagefolder:/x").image_size == 16
    with pytest.raises(UserError, match="is not a trained run"):
        load_run(run / "nope")


@pytest.mark.parametrize("protocol, name", [("mae", "linear-mae"), ("mae-cached", "linear-mae-cached")])
def test_cli_eval_linear_mae_protocol(run, capsys, protocol, name):
    from mage_bench.cli import main

    code = main(["eval", "linear", "--run", str(run), "--protocol", protocol, "--probe-epochs", "3",
                 "--probe-batch-size", "512", "--device", "cpu", "--json"])
    records = json.loads(capsys.readouterr().out)
    assert code == 0 and {r["metric"] for r in records} == {"top1", "top5"}
    assert all(r["evaluator"] == name and r["protocol"] == protocol and r["epochs"] == 3 for r in records)
    assert read_records(run / "eval" / f"{name}.json") == records
    assert main(["eval", "knn", "--run", str(run), "--protocol", protocol]) == 2
    assert "applies to `eval linear` only" in capsys.readouterr().err


def test_config_hash_names_the_tokenizer_by_content_not_path(tmp_path, tiny_tokenizer_dir):
    """The same experiment in two folders hashes the same; other tokenizer weights hash differently."""
    import dataclasses
    import shutil

    from mage_bench.results import path_config_hash

    copies = [shutil.copytree(tiny_tokenizer_dir, tmp_path / name) for name in ("a", "b")]
    base = RunConfig()
    hashes = [config_hash(dataclasses.replace(base, tokenizer=str(c))) for c in copies]
    assert hashes[0] == hashes[1]
    assert path_config_hash(dataclasses.replace(base, tokenizer=str(copies[0]))) != \
        path_config_hash(dataclasses.replace(base, tokenizer=str(copies[1])))
    state = safe_torch_load(copies[1] / "tokenizer.pt")
    state["state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["state_dict"].items()}
    other = tmp_path / "c"
    other.mkdir()
    atomic_torch_save(state, other / "tokenizer.pt")  # no card: the file itself is hashed
    assert config_hash(dataclasses.replace(base, tokenizer=str(other))) != hashes[0]
