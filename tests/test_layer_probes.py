"""Probes at every layer: layer x pooling features from one forward pass, cached per view, in records."""

import json

import numpy as np
import pytest
import torch

from mage_bench.cli import main
from mage_bench.config import DataConfig, EvalConfig, RunConfig, from_dict, resolve_config
from mage_bench.errors import ConfigError
from mage_bench.eval import features
from mage_bench.eval.runner import evaluate_run
from mage_bench.mage import create_model


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_tokenizer_dir):
    from conftest import TINY_MODEL

    from mage_bench.train import train

    layer = {"tokenizer": str(tiny_tokenizer_dir), "model": {**TINY_MODEL, "depth": 3},
             "train": {"steps": 4, "batch_size": 16, "blr": 0.01, "proxy_every": 0, "warmup_steps": 2, "checkpoint_every": 4,
                       "log_every": 2}}
    run_dir = tmp_path_factory.mktemp("runs") / "layers"
    train(resolve_config(RunConfig, layer), run_dir, progress=False)
    return run_dir


def test_the_last_block_mean_is_the_official_feature_and_blocks_stop_early(tiny_model_overrides):
    model = create_model("mage_tiny", **{**tiny_model_overrides, "depth": 3}).eval()
    tokens = torch.randint(0, 32, (4, 64), generator=torch.Generator().manual_seed(0))
    views = model.layer_features(tokens, [0, 2], ["mean", "cls", "mean+cls"])
    assert torch.equal(views[2, "mean"], model.features(tokens))
    assert torch.equal(views[0, "mean+cls"], torch.cat([views[0, "mean"], views[0, "cls"]], dim=1))
    ran = []
    for block in model.blocks:
        block.register_forward_hook(lambda *_: ran.append(1))
    model.layer_features(tokens, [0], ["cls"])
    assert len(ran) == 1  # blocks past the deepest asked are not run
    with pytest.raises(ValueError, match=r"layers must be in \[0, 2\]"):
        model.layer_features(tokens, [3], ["mean"])


def test_views_of_one_pass_equal_single_view_extractions(run, tmp_path, monkeypatch):
    data = DataConfig()
    views = [(0, "mean"), (1, "cls"), (2, "mean"), (2, "mean+cls")]
    calls = []
    real = features.probe_views
    monkeypatch.setattr(features, "probe_views", lambda r, images, v: calls.append(len(images)) or real(r, images, v))
    together, labels, infos = features.extract_views(run, data, "test", views, cache_dir=tmp_path / "all")
    assert len(calls) == 2 and sum(calls) == 360  # one pass over the 360 test images (batches of 256) for all views
    for view in views:
        alone, alone_labels, _ = features.extract_views(run, data, "test", [view], cache_dir=tmp_path / str(view))
        np.testing.assert_array_equal(np.asarray(together[view]), np.asarray(alone[view]))
        np.testing.assert_array_equal(labels, alone_labels)
    assert together[2, "mean+cls"].shape == (360, 64) and together[0, "mean"].shape == (360, 32)
    official, _, info = features.extract_features(run, data, "test", cache_dir=tmp_path / "all")
    assert info["cached"] and info["layer"] == "last_block"  # the official feature keeps its old cache key
    np.testing.assert_array_equal(np.asarray(official), np.asarray(together[2, "mean"]))
    calls.clear()
    features.extract_views(run, data, "test", [(1, "cls"), (0, "mean")], cache_dir=tmp_path / "all")
    assert calls == []  # every view cached: no pass at all


def test_records_carry_the_block_and_pooling_and_the_default_is_unchanged(run, tmp_path):
    settings = EvalConfig(knn_ks=(5,), device="cpu")
    default = evaluate_run(run, ["knn"], settings, cache_dir=tmp_path / "c")["knn"]
    assert {(r["layer"], r["pooling"], r["depth"]) for r in default} == {(2, "mean", 3)}
    deep = evaluate_run(run, ["knn"], from_dict(EvalConfig, {"knn_ks": [5], "layers": "all",
                                                             "pooling": "mean,cls"}, "eval"),
                        cache_dir=tmp_path / "c")["knn"]
    assert sorted({(r["layer"], r["pooling"]) for r in deep}) == [(b, p) for b in range(3) for p in ("cls", "mean")]
    official = [r for r in deep if (r["layer"], r["pooling"]) == (2, "mean")]
    assert [(r["metric"], r.get("k"), r["value"]) for r in official] == \
           [(r["metric"], r.get("k"), r["value"]) for r in default]
    stored = json.loads((run / "eval" / "knn.json").read_text())
    assert len(stored) == len(deep)


def test_layers_and_pooling_on_the_command_line(run, capsys):
    assert main(["eval", "fewshot", "--run", str(run), "--layers", "0,last", "--pooling", "cls",
                 "--fewshot-shots", "1", "--fewshot-draws", "2", "--json", "--quiet"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert {(r["layer"], r["pooling"]) for r in records} == {(0, "cls"), (2, "cls")}
    assert main(["eval", "knn", "--run", str(run), "--layers", "5", "--quiet"]) == 2
    assert "block 5 does not exist; the encoder has 3 blocks (0..2, last = 2)" in capsys.readouterr().err
    assert main(["eval", "knn", "--run", str(run), "--pooling", "max", "--quiet"]) == 2
    assert "pooling must be mean, cls, mean+cls" in capsys.readouterr().err
    assert main(["eval", "linear", "--protocol", "mae", "--run", str(run), "--layers", "0", "--quiet"]) == 2
    assert "use --protocol mae-cached for other layers" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="layers must be last, all or 0-based block indices"):
        from_dict(EvalConfig, {"layers": "first"}, "eval")
