"""The paper preset's whole path at toy scale (tests/preset_smoke.py): ~3 minutes on 2 CPU cores, so it carries
the `smoke` marker, which the default run deselects: `python -m pytest -m smoke` runs it."""

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
