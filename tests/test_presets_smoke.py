"""The paper and cifar10 presets' whole paths at toy scale (tests/preset_smoke.py): minutes on 2 CPU cores, so they
carry the `smoke` marker, which the default run deselects: `python -m pytest -m smoke` runs them."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.smoke


def test_the_paper_preset_runs_end_to_end_at_toy_scale(tmp_path):
    from preset_smoke import main

    assert main(["paper", "--out", str(tmp_path)]) == 0
    results = pd.read_csv(tmp_path / "report" / "results.csv")
    fid = results[(results["evaluator"] == "fid") & (results["role"] == "run")]
    assert set(fid["metric"]) >= {"fid", "is", "kid"} and set(fid["feature_extractor"]) == {"inception-v3"}
    assert set(fid["n_samples"]) == {10} and (fid["value"].notna()).all()
    assert {"linear", "knn", "fewshot"} <= set(results["evaluator"])
    run = next((tmp_path / "runs").glob("*/config.yaml"))
    config = yaml.safe_load(run.read_text())
    assert config["model"]["name"] == "mage_vit_base_patch16" and config["model"]["num_tokens"] == 256
    assert config["data"]["image_size"] == 256 and config["generate"]["temperature"] == 6.0
    assert (tmp_path / "report" / "index.html").is_file()


def test_the_cifar10_preset_runs_end_to_end_at_toy_scale(tmp_path):
    from preset_smoke import main

    assert main(["cifar10", "--out", str(tmp_path)]) == 0
    results = pd.read_csv(tmp_path / "report" / "results.csv")
    fid = results[(results["evaluator"] == "fid") & (results["role"] == "run")]
    assert set(fid["feature_extractor"]) == {"inception-v3"} and (fid["value"].notna()).all()
    assert {"linear", "knn", "fewshot"} <= set(results["evaluator"])
    run = next((tmp_path / "runs").glob("*/config.yaml"))
    config = yaml.safe_load(run.read_text())
    assert config["model"]["name"] == "mage_small" and config["model"]["num_tokens"] == 64
    assert config["data"]["image_size"] == 32 and config["train"]["batch_size"] == 2
    tokenizer = yaml.safe_load((tmp_path / "runs" / "_shared" / "tokenizer" / "config.yaml").read_text())
    assert tokenizer["tokenizer"]["name"] == "vq_digits" and tokenizer["tokenizer"]["resolution"] == 32
    assert (tmp_path / "report" / "index.html").is_file()
