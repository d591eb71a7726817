"""Training-time proxies (`mage_bench.proxies`) and their report section (`mage_bench.report.proxies`).

Training: the proxies leave the weights bitwise as without them, land on the lines of their steps (and the
last step), survive a kill between a proxy step and a checkpoint without duplicated or missing rows, skip
the FD with one warning line when the extractor's weights are not here, and never deadlock under DDP.
Report: curves and the ranking's settled step on synthetic run folders.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mage_bench.config import RunConfig, resolve_config
from mage_bench.errors import ConfigError, UserError
from mage_bench.io import safe_torch_load, sha256_file
from mage_bench.proxies import FD_EXTRACTOR_KEY, FD_KEY, KNN_KEY, KNN_TEST_KEY, KNN_TRAIN_KEY
from mage_bench.train import train

SMALL = {"proxy_samples": 16, "proxy_knn_train": 64, "proxy_knn_test": 32}  # seconds, not minutes


@pytest.fixture
def local_digits_cnn(digits_cnn, monkeypatch):
    """The session's digits-cnn where the proxies look for it (nothing is written into the checkout)."""
    from mage_bench.eval import extractors

    monkeypatch.setattr(extractors, "DIGITS_CNN_DIR", digits_cnn[0].parent)


def _layer(tiny_run_layer, **train_settings):
    return {**tiny_run_layer, "train": {**tiny_run_layer["train"], **SMALL, **train_settings}}


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _timeless(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "time_s"}


def _without_proxies(record: dict) -> dict:
    return {k: v for k, v in _timeless(record).items() if not k.startswith("proxy_")}


def test_proxies_leave_training_bitwise_unchanged(tmp_path, tiny_run_layer, local_digits_cnn, digits_cnn):
    layer = _layer(tiny_run_layer, steps=6, log_every=1, proxy_every=2)
    layer["model"] = {**layer["model"], "dropout": 0.1}  # the dropout stream must not move either
    train(resolve_config(RunConfig, layer), tmp_path / "on", progress=False)
    off = {**layer, "train": {**layer["train"], "proxy_every": 0}}
    train(resolve_config(RunConfig, off), tmp_path / "off", progress=False)
    a, b = safe_torch_load(tmp_path / "on" / "checkpoint.pt"), safe_torch_load(tmp_path / "off" / "checkpoint.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    moments = [(a["optimizer"]["state"][i][m], b["optimizer"]["state"][i][m])
               for i in a["optimizer"]["state"] for m in ("exp_avg", "exp_avg_sq")]
    assert all(torch.equal(x, y) for x, y in moments)
    assert torch.equal(a["torch_rng"][0]["cpu"], b["torch_rng"][0]["cpu"])
    assert torch.equal(a["mask_generator"], b["mask_generator"])
    on_log, off_log = _log(tmp_path / "on"), _log(tmp_path / "off")
    assert [_without_proxies(r) for r in on_log] == [_without_proxies(r) for r in off_log]  # their own keys
    proxy = [r for r in on_log if KNN_KEY in r]
    assert [r["step"] for r in proxy] == [2, 4, 6]
    assert all(FD_KEY in r for r in proxy) and not any(KNN_KEY in r for r in off_log)
    for r in proxy:
        assert 0 <= r[KNN_KEY] <= 1 and np.isfinite(r[FD_KEY]) and r[FD_KEY] >= 0
        assert (r[KNN_TRAIN_KEY], r[KNN_TEST_KEY], r["proxy_fd_samples"], r[FD_EXTRACTOR_KEY]) == (64, 32, 16,
                                                                                                      "digits-cnn")
        assert r["proxy_fd_weights"] == sha256_file(digits_cnn[0])[:16]  # which weights the FD proxy used


def test_proxy_steps_are_log_steps_and_the_last_step_has_one(tmp_path, tiny_run_layer, local_digits_cnn):
    layer = _layer(tiny_run_layer, steps=7, log_every=4, proxy_every=3, proxy_samples=0)
    train(resolve_config(RunConfig, layer), tmp_path / "run", progress=False)
    log = _log(tmp_path / "run")
    assert [r["step"] for r in log] == [3, 4, 6, 7]  # 3 and 6 logged for their proxies, 7: the last step
    assert [r["step"] for r in log if KNN_KEY in r] == [3, 6, 7]
    assert not any(FD_KEY in r for r in log)  # proxy_samples: 0 turns the FD proxy off


def test_resume_after_a_kill_keeps_proxy_rows_once(tmp_path, tiny_run_layer, local_digits_cnn):
    """A kill -9 after lines past the last checkpoint were written (simulated: train on from the checkpoint at
    step 4, then put it back): the resumed log equals an uninterrupted one, proxy rows included."""
    layer = _layer(tiny_run_layer, steps=9, log_every=1, proxy_every=3, checkpoint_every=4)
    cfg = resolve_config(RunConfig, layer)
    train(cfg, tmp_path / "straight", progress=False)
    expected = [_timeless(r) for r in _log(tmp_path / "straight")]
    assert [r["step"] for r in expected if KNN_KEY in r] == [3, 6, 9]
    # Killed at 5: between two proxy steps (3 kept, 6 to come); at 7: after proxy step 6, before checkpoint 8.
    for killed_at in (5, 7):
        run = tmp_path / f"killed-{killed_at}"
        train(cfg, run, progress=False, stop_at=4)
        shutil.copy(run / "checkpoint.pt", tmp_path / "kept.pt")
        train(cfg, run, resume=True, progress=False, stop_at=killed_at)
        assert _log(run)[-1]["step"] == killed_at
        shutil.copy(tmp_path / "kept.pt", run / "checkpoint.pt")  # died before its next checkpoint
        train(cfg, run, resume=True, progress=False)
        assert [_timeless(r) for r in _log(run)] == expected, killed_at


def test_the_fd_proxy_is_skipped_with_one_warning_without_local_weights(tmp_path, tiny_run_layer, monkeypatch,
                                                                          capfd):
    from mage_bench.eval import extractors

    monkeypatch.setattr(extractors, "DIGITS_CNN_DIR", tmp_path / "nowhere")
    layer = _layer(tiny_run_layer, steps=4, log_every=2, proxy_every=2)
    train(resolve_config(RunConfig, layer), tmp_path / "run", progress=False)
    warnings = [line for line in capfd.readouterr().err.splitlines() if "FD proxy" in line]
    assert len(warnings) == 1 and "digits-cnn weights are not at" in warnings[0]
    assert not (tmp_path / "nowhere").exists()  # nothing trained mid-run
    log = _log(tmp_path / "run")
    assert [r["step"] for r in log if KNN_KEY in r] == [2, 4] and not any(FD_KEY in r for r in log)


def test_image_folder_data_uses_inception_only_when_local(tmp_path, tiny_run_layer, monkeypatch, capfd):
    from conftest import write_image_folder

    monkeypatch.delenv("MAGE_BENCH_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # nothing cached, nothing fetched
    write_image_folder(tmp_path / "data", {"train": 6, "val": 3})
    layer = _layer(tiny_run_layer, steps=2, batch_size=4, log_every=1, proxy_every=2)
    layer["data"] = {"name": f"imagefolder:{tmp_path / 'data'}", "image_size": 16}
    train(resolve_config(RunConfig, layer), tmp_path / "run", progress=False)
    err = capfd.readouterr().err
    assert err.count("the FD proxy is skipped (inception-v3)") == 1 and not (tmp_path / "hub").exists()
    last = _log(tmp_path / "run")[-1]
    assert (last[KNN_TRAIN_KEY], last[KNN_TEST_KEY]) == (12, 6) and FD_KEY not in last  # all there is


@pytest.mark.parametrize("setting, message", [
    ({"proxy_every": -1}, "proxy_every must be >= 0"),
    ({"proxy_samples": 1}, "proxy_samples must be 0"),
    ({"proxy_knn_test": -5}, "proxy_knn_train/proxy_knn_test must be >= 0"),
])
def test_bad_proxy_settings_name_the_key(setting, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(RunConfig, {"train": setting})


DDP_SCRIPT = """
import json, sys
from mage_bench.config import RunConfig, resolve_config
from mage_bench.eval import extractors
from pathlib import Path
extractors.DIGITS_CNN_DIR = Path(sys.argv[3])
from mage_bench.train import train
train(resolve_config(RunConfig, json.loads(sys.argv[1])), sys.argv[2], progress=False)
"""


def test_ddp_rank_zero_logs_the_proxies_without_deadlock(tmp_path, tiny_run_layer, digits_cnn):
    script = tmp_path / "train.py"
    script.write_text(DDP_SCRIPT)
    layer = _layer(tiny_run_layer, steps=4, batch_size=8, log_every=1, proxy_every=2)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               json.dumps(layer), str(tmp_path / "run"), str(digits_cnn[0].parent)]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    log = _log(tmp_path / "run")
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # one writer
    assert [r["step"] for r in log if KNN_KEY in r and FD_KEY in r] == [2, 4]


# --------------------------------------------------------------------------------------------
# The report


def _write_sweep(root: Path, finals: dict[str, tuple[float, float]], proxies: dict[str, list[tuple]],
                 seeds=(0, 1)) -> Path:
    """A sweep folder: per point and seed a run with eval/knn.json and eval/fid.json records (the point's
    final values + seed noise) and a metrics.jsonl whose proxy lines hold `proxies[point]`: (step, knn, fd)."""
    from test_report import _record  # noqa: I001  (tests/ is on the path)

    from mage_bench.results import write_records

    runs = []
    for i, (point, (knn, fid)) in enumerate(finals.items()):
        for seed in seeds:
            run = f"p{i}-s{seed}"
            runs.append({"sweep": "s", "run": run, "point": point, "parameter": "masking.spec", "value": point,
                         "seed": seed})
            write_records(root / run / "eval" / "knn.json",
                          [_record("s", run, seed, "knn", "top1", knn + 0.001 * seed, True, k=20)])
            write_records(root / run / "eval" / "fid.json",
                          [_record("s", run, seed, "fid", "fid", fid + 0.001 * seed, False, n_real=64)])
            lines = []
            for step in range(1, 7):
                lines.append({"step": step * 50, "loss": 3.0 - step * 0.1, "time_s": step})
                for proxy_step, knn_p, fd_p in proxies[point]:
                    if proxy_step == step * 50:
                        lines[-1].update({KNN_KEY: knn_p + 0.0001 * seed, FD_KEY: fd_p, KNN_TRAIN_KEY: 1000,
                                          KNN_TEST_KEY: 360, "proxy_fd_samples": 256, FD_EXTRACTOR_KEY: "digits-cnn"})
            (root / run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    points = [{"label": p, "value": p} for p in finals]
    (root / "sweep.json").write_text(json.dumps({"sweep": "s", "parameter": "masking.spec", "points": points,
                                                 "seeds": list(seeds), "runs": runs}))
    return root


# Final kNN rises and FD falls with the point index; the proxies agree from step 200 on (kNN) and never (FD:
# its last step swaps two points).
FINALS = {"a": (0.5, 30.0), "b": (0.6, 20.0), "c": (0.7, 10.0), "d": (0.8, 5.0)}
PROXY_LINES = {
    "a": [(100, 0.40, 9.0), (200, 0.30, 9.0), (300, 0.41, 9.0)],
    "b": [(100, 0.30, 8.0), (200, 0.35, 8.0), (300, 0.45, 7.0)],
    "c": [(100, 0.50, 7.0), (200, 0.40, 7.0), (300, 0.49, 8.0)],
    "d": [(100, 0.20, 6.0), (200, 0.45, 6.0), (300, 0.50, 6.0)],
}


def test_settled_step_is_the_first_after_which_tau_stays_high():
    from mage_bench.report.proxies import settled_step

    steps = [100, 200, 300, 400]
    assert settled_step(steps, [0.9, 0.5, 0.8, 1.0]) == 300
    assert settled_step(steps, [0.9, 0.9, 0.9, 0.9]) == 100
    assert settled_step(steps, [0.9, 0.9, 0.9, 0.7]) is None
    assert settled_step(steps, [0.9, float("nan"), 0.9, 0.9]) == 300


def test_the_report_shows_proxy_curves_and_when_the_ranking_settles(tmp_path):
    from mage_bench.report import build_report
    from mage_bench.report.proxies import proxy_rows, ranking

    root = _write_sweep(tmp_path / "runs", FINALS, PROXY_LINES)
    index = build_report([root], tmp_path / "report")
    html = index.read_text()
    section = html.split("<h2>Training-time proxies</h2>")[1].split("<h2>")[0]
    assert 'alt="training-time proxy curves"' in section and 'alt="rank correlation' in section
    assert "the step from which the ranking is settled is 200" in section
    assert "Proxy FD against the final FD (digits-cnn; not Inception), over 4 points: the ranking is not settled" \
        in section
    text = " ".join(section.split())
    assert "Over 4 points" in text and "counts 6 pairs" in text and "steps of 0.333" in text  # 2 / 6 pairs
    from mage_bench.report.collate import collect

    collected = collect([root])
    runs = json.loads((root / "sweep.json").read_text())["runs"]
    entries = ranking(proxy_rows(runs, collected.folders), collected.results, list(FINALS))
    knn, fd = entries
    assert knn["steps"] == [100, 200, 300] and knn["taus"][1:] == [1.0, 1.0] and knn["taus"][0] < 0.8
    assert fd["taus"][:2] == [1.0, 1.0] and fd["taus"][2] < 0.8 and fd["settled_step"] is None
    assert knn["p_value"] == pytest.approx(2 / 24)  # exact: 1 of the 4! orderings, two-sided
    from conftest import chromium_figures

    shown = chromium_figures(index, tmp_path / "chromium")
    if shown is not None:  # without Chromium, the rest of the test stands
        decoded, total, console = shown
        assert decoded == total and not console, shown


def test_the_proxy_section_is_absent_without_proxy_lines_and_says_when_too_few_points(tmp_path):
    from mage_bench.report import build_report

    plain = {p: [] for p in FINALS}
    html = build_report([_write_sweep(tmp_path / "plain", FINALS, plain)], tmp_path / "r1").read_text()
    assert "Training-time proxies" not in html
    two = {p: FINALS[p] for p in ("a", "b")}
    html = build_report([_write_sweep(tmp_path / "two", two, PROXY_LINES)], tmp_path / "r2").read_text()
    section = html.split("<h2>Training-time proxies</h2>")[1].split("<h2>")[0]
    assert "no rank correlation" in section and "at least 3 points" in section
    assert 'alt="training-time proxy curves"' in section and 'alt="rank correlation' not in section


def test_the_proxy_report_never_imports_torch(tmp_path):
    root = _write_sweep(tmp_path / "runs", FINALS, PROXY_LINES)
    code = ("import sys; from mage_bench.report import build_report; "
            f"build_report([{str(root)!r}], {str(tmp_path / 'report')!r}); "
            "assert 'torch' not in sys.modules, 'report imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_steps_some_point_lacks_are_left_out_and_said(tmp_path):
    """A sweep over the training length: point a stops at step 200, so step 300 ranks only three points and is
    left out (a tau over other points than the rest's is no comparison); the note says so."""
    from mage_bench.report.collate import collect
    from mage_bench.report.proxies import proxy_rows, ranking

    shorter = {**PROXY_LINES, "a": PROXY_LINES["a"][:2]}
    root = _write_sweep(tmp_path / "runs", FINALS, shorter)
    collected = collect([root])
    runs = json.loads((root / "sweep.json").read_text())["runs"]
    knn, _ = ranking(proxy_rows(runs, collected.folders), collected.results, list(FINALS))
    assert knn["steps"] == [100, 200] and knn["taus"][1] == 1.0 and knn["final_step"] == 200
    assert "1 proxy step(s) that some point lacks" in knn["note"]


def test_proxy_settings_are_not_part_of_a_runs_identity(tmp_path, tiny_run_layer):
    """They change what is logged, never the weights: another proxy interval resumes the run, a checkpoint made
    before the proxies existed (no proxy keys) still resumes, and the config hash ignores them."""
    from mage_bench.results import config_hash

    layer = _layer(tiny_run_layer, steps=4, checkpoint_every=2, proxy_every=0)
    config = resolve_config(RunConfig, layer)
    train(config, tmp_path / "run", progress=False)
    other = resolve_config(RunConfig, _layer(tiny_run_layer, steps=4, checkpoint_every=2, proxy_every=3))
    assert config_hash(other) == config_hash(config)
    train(other, tmp_path / "run", resume=True, progress=False)  # no "config differs"
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    state = safe_torch_load(checkpoint)
    for key in ("proxy_every", "proxy_samples", "proxy_knn_train", "proxy_knn_test"):
        del state["config"]["train"][key]  # as written before the proxies existed
    torch.save(state, checkpoint)
    train(config, tmp_path / "run", resume=True, progress=False)
    changed = resolve_config(RunConfig, _layer(tiny_run_layer, steps=4, checkpoint_every=2, proxy_every=0, blr=0.5))
    with pytest.raises(UserError, match="config differs"):  # a setting that changes the weights still counts
        train(changed, tmp_path / "run", resume=True, progress=False)
