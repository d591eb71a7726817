"""The prepared GPU check's own logic, on CPU: its stages at toy sizes, the summary, the budget, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mage_bench import device_check

ROOT = Path(__file__).resolve().parents[1]


def test_every_stage_runs_at_toy_sizes_and_the_summary_says_no_gpu_figure(tmp_path):
    summary = device_check.run_device_check(tmp_path, budget_s=300)
    stages = summary["stages"]
    assert list(stages) == [name for name, _ in device_check.STAGES]
    assert {s["status"] for s in stages.values()} == {"ok"}, stages
    assert summary["profile"] == "cpu-smoke" and "no GPU figure was measured" in summary["note"]
    gpu = stages["gpu_tests"]  # collected and counted, every one skipped without CUDA
    assert gpu["tests"] >= 6 and gpu["skipped"] == gpu["tests"] and gpu["passed"] == 0
    assert stages["bench_train"]["models"][0]["model"] == "mage_tiny" and stages["bench_train"]["models"][0]["mfu"] > 0
    assert stages["generate"]["fp32"]["images_per_s"] > 0 and "bf16" not in stages["generate"]  # bf16: GPU only
    projection = stages["projection"]
    expected = 50_000 / projection["generation_images_per_s"] + 100_000 / projection["extraction_images_per_s"]
    assert abs(projection["projected_s"] - expected) < 1e-6 * expected
    assert json.loads((tmp_path / "device-check.json").read_text()) == json.loads(json.dumps(summary))
    log = (tmp_path / "device-check.log").read_text()
    assert "projection: ok" in log and (tmp_path / "gpu-tests.xml").is_file()


def test_a_spent_budget_skips_the_remaining_stages_and_a_failure_is_recorded(tmp_path, monkeypatch):
    def broken(profile, ctx):
        raise ValueError("no such kernel\nsecond line")

    stages = dict(device_check.STAGES)
    stages["generate"] = broken
    monkeypatch.setattr(device_check, "STAGES", tuple(stages.items()))
    summary = device_check.run_device_check(tmp_path, budget_s=300, stages=("environment", "generate", "projection"))
    assert summary["stages"]["generate"] == {"status": "failed", "error": "ValueError: no such kernel",
                                             "seconds": summary["stages"]["generate"]["seconds"]}
    assert summary["stages"]["projection"]["status"] == "failed"  # it needs the rates the failed stage gives
    assert summary["ok"] is False
    spent = device_check.run_device_check(tmp_path / "b", budget_s=0.0, stages=("environment", "inception"))
    assert [s["status"] for s in spent["stages"].values()] == ["skipped", "skipped"]


def test_the_script_runs_the_check_and_refuses_an_unknown_stage(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    done = subprocess.run([str(ROOT / "scripts" / "device-check"), "--stages", "environment"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "out" / "device-check.json").read_text())
    assert list(summary["stages"]) == ["environment"] and summary["stages"]["environment"]["matmul_tflops"] > 0
    bad = subprocess.run([str(ROOT / "scripts" / "device-check"), "--stages", "environment,warp"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown stage 'warp'" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
