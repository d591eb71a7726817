"""Sweeps: spec validation, naming, running (local, submitit, torchrun), failures, kill/resume, reports."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import TINY_MODEL  # noqa: I001  (tests/ is on the path)

from mage_bench.cli import main
from mage_bench.config import to_dict
from mage_bench.errors import ConfigError, UserError
from mage_bench.sweep_spec import check_parameter, expand, load_spec, slug


def micro_spec(tmp_path: Path, tokenizer: Path, digits_cnn, points=None, seeds=(0,), executor=None,
               name: str = "micro", eval_extra: dict | None = None, proxy_every: int = 0) -> Path:
    """A sweep that runs in seconds: the tests' tiny tokenizer and model, a few steps, 16 samples; no
    training-time proxies unless `proxy_every` asks for them."""
    weights, _ = digits_cnn
    spec = {
        "name": name, "description": "test sweep", "parameter": "masking.spec",
        "points": points or [{"label": "truncnorm (official)", "value": "truncnorm:mean=0.55,std=0.25,min=0.5,max=1.0"},
                             {"label": "fixed 0.75", "value": "fixed:ratio=0.75"}],
        "seeds": list(seeds),
        "run": {"model": dict(TINY_MODEL), "masking": {"mask_ratio_min": 0.5},
                "train": {"steps": 6, "batch_size": 16, "blr": 0.01, "warmup_steps": 2, "checkpoint_every": 2,
                          "log_every": 1, "proxy_every": proxy_every}},
        "tokenizer": {"path": str(tokenizer)},
        "eval": {"num_samples": 16, "weights": str(weights), "device": "cpu", **(eval_extra or {})},
        "executor": executor or {"name": "local"},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# --------------------------------------------------------------------------------------------
# Specs and names


SPECS = ("masking", "contrastive", "drop", "masking-x-contrastive")


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("preset", ["tiny", "digits", "cifar10", "paper"])
def test_builtin_specs_change_one_thing(name, preset):
    """Every built-in spec and preset: the resolved run configs of its points differ only in the swept
    and declared coupled keys (computed here from the resolved configs, not taken from the guard)."""
    from mage_bench.confounds import check_confounds, flatten
    from mage_bench.train import resolve_automatic

    spec = load_spec(name, preset)
    check_parameter(spec)
    plans = expand(spec, "models/x")
    cells = 1
    for axis in spec.axes:
        cells *= len(axis.points)
    assert len(plans) == cells * len(spec.seeds) and len({p.name for p in plans}) == len(plans)
    resolved = [flatten(to_dict(resolve_automatic(p.config))) for p in plans]
    allowed = spec.swept_keys + [c.key for c in spec.coupled] + ["seed"]
    for key in resolved[0]:
        if len({json.dumps(r[key]) for r in resolved}) > 1:
            assert any(key == a or key.startswith(a + ".") for a in allowed), (name, preset, key)
    differs = check_confounds(spec, plans)  # and the guard agrees
    assert [row["point"] for row in differs["table"]] == list(dict.fromkeys(p.point for p in plans))
    drop_shares = {row["derived"]["drop share"] for row in differs["table"]}
    if name != "drop":
        assert drop_shares == {0.5}  # the official drop share at every point
    else:
        assert drop_shares == {0.0, 0.25, 0.5, 0.75}
    augmentations = {row["derived"]["augmentation"] for row in differs["table"]}
    assert len(augmentations) == 1  # one augmentation for every point (MAGE-C included)


def test_builtin_masking_sweep_points():
    spec = load_spec("masking")
    values = {p.value for p in spec.points}
    assert {"truncnorm:mean=0.55,std=0.25,min=0.5,max=1.0", "uniform:low=0.5,high=1.0", "fixed:ratio=0.75",
            "cosine:min=0.5,max=1.0"} <= values and len(spec.points) >= 5
    assert {0.0, 0.01, 0.03, 0.1, 0.3, 1.0} <= {p.value for p in load_spec("contrastive").points}


@pytest.mark.parametrize("name", SPECS)
def test_paper_presets_decode_as_the_published_fid_runs(name):
    for plan in expand(load_spec(name, "paper"), "models/x"):
        assert (plan.config.generate.steps, plan.config.generate.temperature) == (20, 6.0)
    for plan in expand(load_spec(name, "digits"), "models/x"):  # the digits presets keep the script defaults
        assert (plan.config.generate.steps, plan.config.generate.temperature) == (12, 4.5)


def test_spec_typos_are_one_line_errors_with_key_paths(tmp_path, tiny_tokenizer_dir, digits_cnn, capsys):
    path = micro_spec(tmp_path, tiny_tokenizer_dir, digits_cnn)
    raw = yaml.safe_load(path.read_text())
    cases = [
        ({"evaluation": {}}, "unknown config key 'evaluation'"),
        ({"seedz": [1]}, "did you mean 'seeds'"),
        ({"run": {"train": {"stepz": 3}}}, "train.stepz"),
        ({"eval": {"num_sample": 3}}, "eval.num_sample"),
        ({"parameter": "masking.spex"}, "masking.spex"),
        ({"points": [{"label": "a", "value": "nope:x=1"}]}, "points[0]"),
        ({"points": [{"label": "a", "value": "cosine:min=0.5,max=1.0"}, {"label": "a", "value": "cosine:min=0.5,max=1.0"}]}, "used twice"),
        ({"run": {"seed": 3}}, "seeds are a sweep axis"),
        ({"name": ".."}, "name must be lower-case"),  # never runs/.. as a sweep folder
        ({"executor": {"name": "kubernetes"}}, "kubernetes"),
    ]
    for change, message in cases:
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({**raw, **change}))
        assert main(["sweep", str(bad), "--runs", str(tmp_path / "r"), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (change, err)
    assert not (tmp_path / "r").exists()  # nothing ran


def test_guard_refuses_a_hidden_difference_and_shows_declared_coupling(tmp_path, tiny_tokenizer_dir, digits_cnn,
                                                                       capsys):
    runs = tmp_path / "runs"
    points = [{"label": "official", "value": "truncnorm:mean=0.55,std=0.25,min=0.5,max=1.0"},
              {"label": "longer", "value": "fixed:ratio=0.75", "overrides": {"train": {"steps": 8}}}]
    path = micro_spec(tmp_path, tiny_tokenizer_dir, digits_cnn, points=points)
    assert main(["sweep", str(path), "--runs", str(runs), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.steps" in err and "'official'" in err and "'longer'" in err
    assert "coupled:" in err and not runs.exists()
    # An "auto" that resolves differently is a difference too: the drop share follows each lower bound.
    raw = yaml.safe_load(path.read_text())
    raw["run"]["masking"] = {}
    raw["points"] = [{"label": "official", "value": "truncnorm:mean=0.55,std=0.25,min=0.5,max=1.0"},
                     {"label": "fixed", "value": "fixed:ratio=0.75"}]
    path.write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(path), "--runs", str(runs), "--dry-run"]) == 2
    assert "masking.mask_ratio_min" in capsys.readouterr().err
    # Declared, the same coupling passes: the dry run prints it, and sweep.json records it.
    raw["points"] = points
    raw["coupled"] = [{"key": "train.steps", "reason": "the longer point is longer on purpose"}]
    path.write_text(yaml.safe_dump(raw | {"run": {**raw["run"], "masking": {"mask_ratio_min": 0.5}}}))
    assert main(["sweep", str(path), "--runs", str(runs), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "train.steps (coupled)" in out and "the longer point is longer on purpose" in out
    assert main(["sweep", str(path), "--runs", str(runs), "--out", str(tmp_path / "report")]) == 0
    differs = json.loads((runs / "sweep.json").read_text())["differs"]
    assert differs["coupled"] == raw["coupled"] and differs["swept"] == ["masking.spec"]
    table = {row["point"]: row for row in differs["table"]}
    assert table["longer"]["values"]["train.steps"] == 8 and table["official"]["values"]["train.steps"] == 6
    assert table["longer"]["derived"] == {"drop share": 0.5, "encoder length": 1 + 64 - 32, "mean masking ratio": 0.75,
                                          "augmentation": "none", "steps": 8}


def test_coupled_and_grid_spec_errors(tmp_path, tiny_tokenizer_dir, digits_cnn, capsys):
    path = micro_spec(tmp_path, tiny_tokenizer_dir, digits_cnn)
    raw = yaml.safe_load(path.read_text())
    axis = {"parameter": "contrastive.weight", "points": [{"label": "w0", "value": 0.0}]}
    cases = [
        ({"coupled": [{"key": "train.steps"}]}, "reason"),
        ({"coupled": [{"key": "train.stepz", "reason": "x"}]}, "train.stepz"),
        ({"coupled": [{"key": "masking.spec", "reason": "x"}]}, "swept already"),
        ({"parameters": [axis]}, "not both"),
        ({"parameter": "", "points": [], "parameters": [axis, axis]}, "listed twice"),
        ({"parameter": "", "points": [], "parameters": [
            {"parameter": "masking.spec", "points": [{"label": "a × b", "value": "fixed:ratio=0.75"},
                                                     {"label": "a", "value": "fixed:ratio=0.6"}]},
            {"parameter": "contrastive.weight", "points": [{"label": "c", "value": 0.0},
                                                           {"label": "b × c", "value": 0.1}]}]},
         "made twice"),
    ]
    for change, message in cases:
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({**raw, **change}))
        assert main(["sweep", str(bad), "--runs", str(tmp_path / "r"), "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (change, err)


def grid_spec(tmp_path: Path, tokenizer: Path, digits_cnn) -> Path:
    """A 2 x 2 grid (masking distribution x contrastive weight), one seed per cell."""
    path = micro_spec(tmp_path, tokenizer, digits_cnn, name="grid")
    raw = yaml.safe_load(path.read_text())
    del raw["parameter"], raw["points"]
    raw["parameters"] = [
        {"parameter": "masking.spec", "points": [{"label": "official", "value": "truncnorm:mean=0.55,std=0.25,min=0.5,max=1.0"},
                                                 {"label": "fixed", "value": "fixed:ratio=0.75"}]},
        {"parameter": "contrastive.weight", "points": [{"label": "w0", "value": 0.0}, {"label": "w1", "value": 1.0}]},
    ]
    raw["run"]["train"]["augment"] = "affine"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_grid_expands_to_the_full_product_with_stable_names(tmp_path, tiny_tokenizer_dir, digits_cnn):
    spec = load_spec(str(grid_spec(tmp_path, tiny_tokenizer_dir, digits_cnn)))
    plans = expand(spec, "t")
    assert [p.point for p in plans] == ["official × w0", "official × w1", "fixed × w0", "fixed × w1"]
    assert len({p.name for p in plans}) == 4 and [p.name for p in plans] == [p.name for p in expand(spec, "t")]
    assert plans[1].axes == {"masking.spec": "official", "contrastive.weight": "w1"}
    assert plans[1].value == {"masking.spec": "truncnorm:mean=0.55,std=0.25,min=0.5,max=1.0", "contrastive.weight": 1.0}
    assert plans[1].config.contrastive.weight == 1.0 and plans[2].config.masking.spec == "fixed:ratio=0.75"
    # a one-axis spec keeps the run names it always had: label slug, sha256 of [label, value, overrides], seed
    import hashlib

    point = load_spec("masking").points[0]
    digest = hashlib.sha256(json.dumps([point.label, point.value, {}], sort_keys=True).encode()).hexdigest()[:6]
    assert expand(load_spec("masking"), "t")[0].name == f"{slug(point.label)}-{digest}-s0"


def test_grid_sweep_runs_and_resumes_cell_by_cell(tmp_path, tiny_tokenizer_dir, digits_cnn):
    path = grid_spec(tmp_path, tiny_tokenizer_dir, digits_cnn)
    runs, report = tmp_path / "runs", tmp_path / "report"
    assert main(["sweep", str(path), "--runs", str(runs), "--out", str(report)]) == 0
    sweep = json.loads((runs / "sweep.json").read_text())
    assert [a["parameter"] for a in sweep["axes"]] == ["masking.spec", "contrastive.weight"]
    assert [p["axes"] for p in sweep["points"]][1] == {"masking.spec": "official", "contrastive.weight": "w1"}
    assert sweep["parameter"] == "masking.spec × contrastive.weight"
    before = _results(report)
    assert set(before[before["role"] == "run"]["point"]) == {"official × w0", "official × w1", "fixed × w0",
                                                             "fixed × w1"}
    # One cell interrupted mid-training (DONE gone, checkpoint at step 4 of 6), one never started.
    cells = [r["run"] for r in sweep["runs"]]
    import shutil

    shutil.rmtree(runs / cells[0])
    (runs / cells[3] / "DONE").unlink()
    mtimes = {c: (runs / c / "checkpoint.pt").stat().st_mtime_ns for c in cells[1:3]}
    assert main(["sweep", str(path), "--runs", str(runs), "--out", str(report)]) == 0
    assert {c: (runs / c / "checkpoint.pt").stat().st_mtime_ns for c in cells[1:3]} == mtimes  # done cells kept
    skipped = {r["run"]: r["skipped"] for r in json.loads((runs / "sweep.json").read_text())["runs"]}
    assert skipped == {cells[0]: False, cells[1]: True, cells[2]: True, cells[3]: False}
    pd.testing.assert_frame_equal(before, _results(report))  # the same numbers as uninterrupted


def test_run_names_are_safe_and_deterministic():
    for label in ["../../etc/passwd", "<script>alert(1)</script>", "a/b\\c", "..", "", "Ünïcode ✓"]:
        name = slug(label)
        assert name and "/" not in name and "\\" not in name and name not in (".", "..") and ".." not in name
        assert set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789._-")
    spec = load_spec("masking", "tiny")
    assert [p.name for p in expand(spec, "t")] == [p.name for p in expand(spec, "t")]


def test_dry_run_prints_the_table_and_runs_nothing(tmp_path, tiny_tokenizer_dir, digits_cnn, capsys):
    path = micro_spec(tmp_path, tiny_tokenizer_dir, digits_cnn, seeds=(0, 1))
    assert main(["sweep", str(path), "--runs", str(tmp_path / "runs"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("todo") == 4 and "would execute: 4 of 4 runs" in out
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------------
# Running


def _results(report: Path) -> pd.DataFrame:
    frame = pd.read_csv(report / "results.csv")
    return frame.drop(columns=["created_at"]).sort_values(["run", "evaluator", "metric", "k", "shots"]) \
        .reset_index(drop=True)


def test_local_sweep_end_to_end_then_skips_done_runs(tmp_path, tiny_tokenizer_dir, digits_cnn, capsys):
    path = micro_spec(tmp_path, tiny_tokenizer_dir, digits_cnn,
                      eval_extra={"inpaint": ["random:0.5", "box:center"], "inpaint_images": 12,
                                  "layers": "0,last", "pooling": "mean,cls", "finetune": "digits",
                                  "finetune_steps": 2}, proxy_every=3)
    runs, report = tmp_path / "runs", tmp_path / "report"
    assert main(["sweep", str(path), "--runs", str(runs), "--out", str(report)]) == 0
    out = capsys.readouterr().out
    assert f"report: {report / 'index.html'}" in out
    results = pd.read_csv(report / "results.csv")
    assert {"linear", "fewshot", "knn", "fid", "inpaint"} <= set(results["evaluator"])
    inpaint = results[results["evaluator"] == "inpaint"]  # a spec's eval.inpaint: every run, every mask
    assert len(inpaint[inpaint["role"] == "run"]) == 2 * 2 * 3 and set(inpaint["mask"]) == {"random:0.5", "box:center"}
    assert set(inpaint[inpaint["role"] == "reference"]["point"]) == {"reference: untrained model"}
    assert "Masked reconstruction (inpainting)" in (report / "index.html").read_text()
    knn = results[(results["evaluator"] == "knn") & (results["role"] == "run") & (results["metric"] == "top1")]
    assert set(zip(knn["layer"], knn["pooling"], strict=True)) == {(0, "mean"), (0, "cls"), (1, "mean"), (1, "cls")}
    assert "Representation against depth" in (report / "index.html").read_text()  # eval.layers: the profile
    proxy_steps = [json.loads(line)["step"] for line in next(runs.glob("fixed-*/metrics.jsonl")).read_text().splitlines()
                   if "proxy_knn_top1" in line]
    assert proxy_steps == [3, 6] and "<h2>Training-time proxies</h2>" in (report / "index.html").read_text()
    finetune = results[results["evaluator"] == "finetune"]  # eval.finetune: every run and the untrained model
    assert len(finetune[finetune["role"] == "run"]) == 2 * 2 and set(finetune["metric"]) == {"top1", "top5"}
    assert set(finetune[finetune["role"] == "reference"]["point"]) == {"reference: untrained model"}
    assert set(finetune["steps"]) == {2} and set(finetune["preset"]) == {"digits"}
    assert set(results[results["role"] == "reference"]["point"]) == {
        "reference: raw pixels", "reference: untrained model", "reference: real held-out images"}
    assert set(results[results["role"] == "run"]["sweep"]) == {"micro"}
    summary = pd.read_csv(report / "summary.csv")
    assert {"mean", "std", "count"} <= set(summary.columns)
    html = (report / "index.html").read_text()
    table = html.split("<h2>Summary")[1].split("</table>")[0]
    assert "FD (digits-cnn; not Inception)" in table and ">FID" not in table  # never called Inception FID
    assert "Seed spread unknown" in html  # one seed per point: the page says the spread cannot be judged
    sweep = json.loads((runs / "sweep.json").read_text())
    assert set(sweep["densities"]) == {"truncnorm (official)", "fixed 0.75"}
    # Second run: every run is DONE, nothing retrains, the results are the same.
    before = _results(report)
    mtimes = {p: p.stat().st_mtime_ns for p in runs.glob("*/checkpoint.pt")}
    assert main(["sweep", str(path), "--runs", str(runs), "--out", str(report)]) == 0
    assert {p: p.stat().st_mtime_ns for p in runs.glob("*/checkpoint.pt")} == mtimes
    pd.testing.assert_frame_equal(before, _results(report))
    # An edited spec never reuses runs made from the old config.
    edited = yaml.safe_load(path.read_text())
    edited["run"]["train"]["steps"] = 7
    path.write_text(yaml.safe_dump(edited))
    assert main(["sweep", str(path), "--runs", str(runs), "--out", str(report)]) == 2
    assert "made from another config" in capsys.readouterr().err


def test_presets_are_separate_sweeps():
    assert load_spec("masking").name == "masking"  # the default preset keeps the plain name
    assert load_spec("masking", "tiny").name == "masking"
    assert load_spec("masking", "digits").name == "masking-digits"


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(tmp_path, tiny_tokenizer_dir, digits_cnn, capsys):
    points = [{"label": "good", "value": "fixed:ratio=0.75"},
              {"label": "diverges", "value": "fixed:ratio=0.75", "overrides": {"train": {"blr": 1.0e30}}}]
    path = micro_spec(tmp_path, tiny_tokenizer_dir, digits_cnn, points=points)
    raw = yaml.safe_load(path.read_text())
    raw["coupled"] = [{"key": "train.blr", "reason": "one point diverges on purpose"}]
    path.write_text(yaml.safe_dump(raw))
    code = main(["sweep", str(path), "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "report")])
    captured = capsys.readouterr()
    assert code == 1 and "1 of 2 runs failed" in captured.err
    failed = list((tmp_path / "runs").glob("diverges-*/FAILED"))
    assert len(failed) == 1 and "non-finite" in json.loads(failed[0].read_text())["error"]
    assert list((tmp_path / "runs").glob("good-*/DONE"))
    html = (tmp_path / "report" / "index.html").read_text()
    assert "1 run(s) failed" in html and "diverges" in html


def test_report_escapes_user_text(tmp_path, tiny_tokenizer_dir, digits_cnn):
    points = [{"label": "<script>alert(1)</script>", "value": "fixed:ratio=0.75"},
              {"label": "$\\frac{a}{ cost $5", "value": "cosine:min=0.5,max=1.0"}]
    path = micro_spec(tmp_path, tiny_tokenizer_dir, digits_cnn, points=points)
    assert main(["sweep", str(path), "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    html = (tmp_path / "report" / "index.html").read_text()
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.count("<script>") == 1  # only the page's own figure check
    assert "$\\frac{a}{ cost $5" in html  # a label matplotlib would parse as math is drawn and shown as text


def test_report_never_imports_torch(tmp_path, tiny_tokenizer_dir, digits_cnn):
    path = micro_spec(tmp_path, tiny_tokenizer_dir, digits_cnn, points=[{"label": "a", "value": "cosine:min=0.5,max=1.0"}])
    assert main(["sweep", str(path), "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "r1")]) == 0
    code = ("import sys; from mage_bench.report import build_report; "
            f"build_report([{str(tmp_path / 'runs')!r}], {str(tmp_path / 'r2')!r}); "
            "assert 'torch' not in sys.modules, 'report imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "r2" / "index.html").is_file()
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r3")]) == 2


def test_slurm_executor_through_submitit_local(tmp_path, tiny_tokenizer_dir, digits_cnn):
    executor = {"name": "slurm", "slurm": {"cluster": "local", "timeout_min": 10, "gpus_per_node": 0}}
    path = micro_spec(tmp_path, tiny_tokenizer_dir, digits_cnn, executor=executor)
    assert main(["sweep", str(path), "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "report"),
                 "--time-min", "15", "--mem-gb", "4"]) == 0
    assert len(list((tmp_path / "runs").glob("*/DONE"))) == 2
    assert list((tmp_path / "runs" / "_shared" / "submitit").glob("*_result.pkl"))
    # Rerun with the first run's DONE removed: the other run skipped, statuses in plan order; the trained
    # run gets an evaluation job only, which recomputes nothing (its records' inputs match).
    first = json.loads((tmp_path / "runs" / "sweep.json").read_text())["runs"][0]["run"]
    (tmp_path / "runs" / first / "DONE").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs" / first / "eval").glob("*.json")}
    assert main(["sweep", str(path), "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    runs = json.loads((tmp_path / "runs" / "sweep.json").read_text())["runs"]
    assert [(r["run"] == first, r["skipped"]) for r in runs] == [(True, False), (False, True)]
    assert runs[0]["slurm_jobs"].keys() == {"evaluate"} and (tmp_path / "runs" / first / "DONE").is_file()
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs" / first / "eval").glob("*.json")} == before


def test_torchrun_executor_trains_with_two_processes(tmp_path, tiny_tokenizer_dir, digits_cnn, monkeypatch):
    """Training under torchrun, evaluation in a subprocess of its own: never in the sweep's process, where
    the GPU memory it cached would stay while the next run trains."""
    from mage_bench import run_job

    def not_here(*args, **kwargs):
        raise AssertionError("a run was evaluated in the sweep's process")

    monkeypatch.setattr(run_job, "evaluate_stage", not_here)
    path = micro_spec(tmp_path, tiny_tokenizer_dir, digits_cnn, points=[{"label": "a", "value": "cosine:min=0.5,max=1.0"}],
                      executor={"name": "torchrun", "nproc_per_node": 2})
    assert main(["sweep", str(path), "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    run = next((tmp_path / "runs").glob("a-*-s0"))
    assert (run / "DONE").is_file() and len(list((run / "eval").glob("*.json"))) == 4
    from mage_bench.runs import load_run

    assert load_run(run).step == 6


@pytest.mark.parametrize("make_spec", [micro_spec, grid_spec], ids=["one-axis", "grid"])
def test_sigkill_then_rerun_gives_the_uninterrupted_results(tmp_path, tiny_tokenizer_dir, digits_cnn, make_spec):
    path = make_spec(tmp_path, tiny_tokenizer_dir, digits_cnn)
    command = [sys.executable, "-m", "mage_bench.cli", "sweep", str(path), "--quiet"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    tic = time.perf_counter()
    subprocess.run([*command, "--runs", str(tmp_path / "a"), "--out", str(tmp_path / "ra")], check=True, env=env)
    duration = time.perf_counter() - tic
    # Kill at a random moment of the same sweep (seeded: reproducible), then rerun the same command.
    delay = random.Random(0).uniform(0.3, 0.9) * duration
    process = subprocess.Popen([*command, "--runs", str(tmp_path / "b"), "--out", str(tmp_path / "rb")], env=env)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()
    subprocess.run([*command, "--runs", str(tmp_path / "b"), "--out", str(tmp_path / "rb")], check=True, env=env)
    a, b = _results(tmp_path / "ra"), _results(tmp_path / "rb")
    assert len(a) == len(b) and not b.duplicated(["run", "evaluator", "metric", "k", "shots"]).any()
    pd.testing.assert_frame_equal(a, b)


def test_unknown_sweep_and_preset_are_one_line(capsys):
    assert main(["sweep", "maskin", "--dry-run"]) == 2
    assert "did you mean 'masking'" in capsys.readouterr().err
    assert main(["sweep", "masking", "--preset", "huge", "--dry-run"]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err
    with pytest.raises((ConfigError, UserError)):
        load_spec("masking", "nope")


CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
                 if Path(p).is_file()), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (Debian: apt install chromium)")
def test_report_renders_in_headless_chromium(tmp_path, tiny_tokenizer_dir, digits_cnn):
    import re

    path = micro_spec(tmp_path, tiny_tokenizer_dir, digits_cnn, seeds=(0, 1))
    assert main(["sweep", str(path), "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    index = tmp_path / "report" / "index.html"
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=10000", "--dump-dom", index.as_uri()],
        capture_output=True, text=True, timeout=180)
    marker = re.search(r'data-figures="(\d+)/(\d+)"', result.stdout)
    assert marker, result.stderr[-2000:]
    loaded, total = map(int, marker.groups())
    assert loaded == total >= 5  # figures and sample grids all decoded
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console


def test_existing_run_folders_are_matched_by_config_hash_old_or_new(tmp_path):
    """A folder from another config is refused; one written before the tokenizer was hashed by content
    (its meta holds the path-based hash) is still recognised."""
    from mage_bench.results import path_config_hash
    from mage_bench.runs import RUN_META
    from mage_bench.sweep import check_existing_runs

    spec = load_spec("masking")
    plans = expand(spec, str(tmp_path / "tokenizer"))[:1]
    meta = tmp_path / "runs" / plans[0].name / RUN_META
    meta.parent.mkdir(parents=True)
    for stored in (plans[0].meta(spec)["config_hash"], path_config_hash(plans[0].config)):
        meta.write_text(json.dumps({"config_hash": stored}))
        check_existing_runs(tmp_path / "runs", plans, spec)
    meta.write_text(json.dumps({"config_hash": "0" * 64}))
    with pytest.raises(UserError, match="made from another config"):
        check_existing_runs(tmp_path / "runs", plans, spec)


def test_a_reference_folder_published_twice_keeps_the_first(tmp_path):
    """Runs sharing a cache reach the same FID reference together: the second publisher discards its copy."""
    from mage_bench.io import atomic_folder

    target = tmp_path / "reference"
    for content in ("first", "second"):
        with atomic_folder(target) as staging:
            (staging / "a.txt").write_text(content)
    assert (target / "a.txt").read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["reference"]
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "broken") as staging:
        (staging / "a.txt").write_text("half")
        raise RuntimeError("killed")
    assert not (tmp_path / "broken").exists() and [p.name for p in tmp_path.iterdir()] == ["reference"]


def test_slurm_tasks_train_one_ddp_run_equal_to_torchrun(tmp_path, tiny_tokenizer_dir, digits_cnn, monkeypatch):
    """Two submitit tasks (local cluster, CPU, gloo) form one process group of 2 and train exactly what
    torchrun's 2 processes train; rank 0 alone writes the log and the records; a job killed after a
    checkpoint and submitted again resumes there."""
    import torch

    from mage_bench.io import safe_torch_load

    # torchrun gives each process one OpenMP thread; the tasks get the same, so the sums match bitwise.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    point = [{"label": "a", "value": "cosine:min=0.5,max=1.0"}]
    slurm = {"name": "slurm", "slurm": {"cluster": "local", "timeout_min": 10, "gpus_per_node": 0, "tasks_per_node": 2}}
    runs = {}
    for name, executor in (("slurm", slurm), ("torchrun", {"name": "torchrun", "nproc_per_node": 2})):
        (tmp_path / name).mkdir()
        path = micro_spec(tmp_path / name, tiny_tokenizer_dir, digits_cnn, points=point, executor=executor)
        spec = yaml.safe_load(path.read_text())
        spec["eval"]["references"] = False  # the runs are compared here, not against the reference rows
        path.write_text(yaml.safe_dump(spec))
        assert main(["sweep", str(path), "--runs", str(tmp_path / name / "runs"), "--out",
                     str(tmp_path / name / "report")]) == 0
        runs[name] = next((tmp_path / name / "runs").glob("a-*-s0"))
    for run in runs.values():
        launch = json.loads((run / "launch.json").read_text())
        assert (launch["world_size"], launch["global_batch"]) == (2, 32)
        assert json.loads((run.parent / "sweep.json").read_text())["runs"][0]["launch"] == launch
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, 7))  # one writer: each step logged once
        assert sorted(p.name for p in (run / "eval").glob("*.json")) == ["fewshot.json", "fid.json", "knn.json",
                                                                          "linear.json"]
    a, b = (safe_torch_load(runs[name] / "checkpoint.pt")["model"] for name in ("slurm", "torchrun"))
    assert all(torch.equal(a[key], b[key]) for key in a)  # the same DDP computation: bitwise equal
    # Slurm: a 2-task training job, then the run's evaluation as a job of its own with one task.
    jobs = json.loads((runs["slurm"].parent / "sweep.json").read_text())["runs"][0]["slurm_jobs"]
    assert jobs.keys() == {"train", "evaluate"} and jobs["train"] != jobs["evaluate"]
    results = runs["slurm"].parent / "_shared" / "submitit"
    assert [len(list(results.glob(f"{jobs[stage]}_*_result.pkl"))) for stage in ("train", "evaluate")] == [2, 1]

    # A job killed after its checkpoint at step 3 (2 processes) and submitted again resumes there.
    spec_path = tmp_path / "slurm" / "micro.yaml"
    plan = expand(load_spec(str(spec_path)), str(tiny_tokenizer_dir))[0]
    partial = tmp_path / "resumed" / plan.name
    script = tmp_path / "partial.py"
    script.write_text("import json, sys\nfrom mage_bench.config import RunConfig, from_dict\n"
                      "from mage_bench.train import train\n"
                      "train(from_dict(RunConfig, json.loads(sys.argv[1])), sys.argv[2], stop_at=3, progress=False)\n")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                    json.dumps(to_dict(plan.config)), str(partial)], check=True, timeout=300,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    before = (partial / "metrics.jsonl").read_text().splitlines()
    assert len(before) == 3
    assert main(["sweep", str(spec_path), "--runs", str(tmp_path / "resumed"), "--out", str(tmp_path / "r3")]) == 0
    after = (partial / "metrics.jsonl").read_text().splitlines()
    assert after[:3] == before and len(after) == 6  # the first three steps kept (their times too): resumed
    c = safe_torch_load(partial / "checkpoint.pt")["model"]
    assert all(torch.equal(a[key], c[key]) for key in a)


def test_a_resume_on_another_process_count_is_refused(tmp_path, tiny_tokenizer_dir, digits_cnn, tiny_run_layer):
    """A run partly trained on 2 processes is not resumed on 1 (global batch and lr would change)."""
    from mage_bench.config import RunConfig, resolve_config
    from mage_bench.train import train

    point = [{"label": "a", "value": "cosine:min=0.5,max=1.0"}]
    path = micro_spec(tmp_path, tiny_tokenizer_dir, digits_cnn, points=point)
    run_dir = expand(load_spec(str(path)), str(tiny_tokenizer_dir))[0]
    run = tmp_path / "runs" / run_dir.name
    train(run_dir.config, run, stop_at=2, progress=False)
    launch = json.loads((run / "launch.json").read_text())
    assert launch["world_size"] == 1
    (run / "launch.json").write_text(json.dumps({**launch, "world_size": 2, "global_batch": 32}))
    code = main(["sweep", str(path), "--runs", str(tmp_path / "runs"), "--dry-run"])
    assert code == 2
    with pytest.raises(UserError, match="trained with 2 processes .* resuming with 1"):
        train(resolve_config(RunConfig, to_dict(run_dir.config)), run, resume=True, progress=False)


def test_a_preempted_slurm_task_requeues_the_same_call():
    from submitit.helpers import DelayedSubmission

    from mage_bench.run_job import RunTask

    requeued = RunTask().checkpoint("plan", "spec", "runs", "cpu")
    assert isinstance(requeued, DelayedSubmission) and isinstance(requeued.function, RunTask)
    assert requeued.args == ("plan", "spec", "runs", "cpu")
