"""Sweeps at scale (issue 16): extractor weights checked before any training, evaluation as its own stage
(a subprocess under torchrun, its own one-task Slurm job), and evaluators with records skipped on a rerun."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_sweep import _results, micro_spec  # noqa: I001  (tests/ is on the path)

from mage_bench.cli import main

ONE_POINT = [{"label": "a", "value": "cosine:min=0.5,max=1.0"}]
SLURM = {"name": "slurm", "slurm": {"cluster": "local", "timeout_min": 10, "gpus_per_node": 0}}


def one_run_spec(tmp_path: Path, tokenizer: Path, digits_cnn, executor: dict | None = None, **eval_settings) -> Path:
    """One point, one seed, no reference rows, fewer kNN and few-shot settings: a single run to look at."""
    path = micro_spec(tmp_path, tokenizer, digits_cnn, points=ONE_POINT, executor=executor)
    raw = yaml.safe_load(path.read_text())
    raw["eval"].update({"references": False, "knn_ks": [10], "fewshot_shots": [1, 5], "fewshot_draws": 2,
                        **eval_settings})
    path.write_text(yaml.safe_dump(raw))
    return path


def _mtimes(run: Path) -> dict[str, int]:
    """Modification times of what training and evaluation write (DONE and timing.json aside)."""
    files = [run / "checkpoint.pt", run / "metrics.jsonl", *sorted((run / "eval").glob("*.json")),
             *sorted(p for p in (run / "samples").glob("*.png") if p.name != "grid.png")]  # the grid is redrawn
    return {str(path.relative_to(run)): path.stat().st_mtime_ns for path in files}


@pytest.mark.parametrize("executor", [None, SLURM, {"name": "torchrun", "nproc_per_node": 1}],
                         ids=["local", "slurm", "torchrun"])
def test_missing_extractor_weights_stop_the_sweep_before_training(tmp_path, tiny_tokenizer_dir, digits_cnn, capsys,
                                                                  executor):
    path = one_run_spec(tmp_path, tiny_tokenizer_dir, digits_cnn, executor, extractor="inception-v3",
                        weights="/nonexistent/file.pth")
    runs = tmp_path / "runs"
    for dry_run in (["--dry-run"], []):
        assert main(["sweep", str(path), "--runs", str(runs), "--out", str(tmp_path / "report"), *dry_run]) == 2
        err = capsys.readouterr().err
        assert "/nonexistent/file.pth" in err and err.count("\n") == 1, err
        assert not runs.exists()  # no run folder, no checkpoint, no job: nothing trained


def test_dry_run_names_the_extractor_weights(tmp_path, tiny_tokenizer_dir, digits_cnn, capsys):
    path = one_run_spec(tmp_path, tiny_tokenizer_dir, digits_cnn)
    assert main(["sweep", str(path), "--runs", str(tmp_path / "runs"), "--dry-run"]) == 0
    assert f"FID extractor weights: {digits_cnn[0]}" in capsys.readouterr().out


def test_local_rerun_skips_the_recorded_evaluators(tmp_path, tiny_tokenizer_dir, digits_cnn):
    path = one_run_spec(tmp_path, tiny_tokenizer_dir, digits_cnn)
    runs, report = tmp_path / "runs", tmp_path / "report"
    assert main(["sweep", str(path), "--runs", str(runs), "--out", str(report)]) == 0
    run = next(runs.glob("a-*-s0"))
    before, results = _mtimes(run), _results(report)
    assert json.loads((run / "timing.json").read_text()).keys() >= {"train_s", "generation_s", "evaluation_s"}
    # Interrupted after its records were written, before DONE: nothing is trained or computed again.
    (run / "DONE").unlink()
    assert main(["sweep", str(path), "--runs", str(runs), "--out", str(report)]) == 0
    assert (run / "DONE").is_file() and _mtimes(run) == before
    assert json.loads((runs / "sweep.json").read_text())["runs"][0]["skipped"] is False
    pd.testing.assert_frame_equal(results, _results(report))
    # One record lost: only that evaluator runs again, with the same numbers.
    (run / "DONE").unlink()
    (run / "eval" / "knn.json").unlink()
    assert main(["sweep", str(path), "--runs", str(runs), "--out", str(report)]) == 0
    after = _mtimes(run)
    assert after.pop("eval/knn.json") > before.pop("eval/knn.json") and after == before
    pd.testing.assert_frame_equal(results, _results(report))


def test_the_evaluation_entry_point(tmp_path, capsys):
    from submitit.helpers import DelayedSubmission

    from mage_bench.config import EvalConfig
    from mage_bench.run_job import EvaluateTask, EvaluationJob, build_parser
    from mage_bench.run_job import main as run_job_main

    job = EvaluationJob(tmp_path / "run", EvalConfig(knn_ks=(1, 3), device="cpu"), "s", tmp_path / "cache", "cpu")
    assert EvaluationJob.from_args(build_parser().parse_args(["evaluate", *job.argv()])) == job
    requeued = EvaluateTask().checkpoint(job)
    assert isinstance(requeued, DelayedSubmission) and isinstance(requeued.function, EvaluateTask)
    assert requeued.args == (job,)
    bad = [*job.argv()[:-1], json.dumps({"num_sample": 3})]
    assert run_job_main(["evaluate", *bad]) == 2
    err = capsys.readouterr().err
    assert "eval.num_sample" in err and err.count("\n") == 1
    # A folder that is not a trained run: FAILED says why, exit 1, no DONE.
    assert run_job_main(["evaluate", *job.argv()]) == 1
    assert "not a trained run" in json.loads((tmp_path / "run" / "FAILED").read_text())["error"]
    assert not (tmp_path / "run" / "DONE").exists()


def test_timing_takes_the_gpu_peak_memory_that_training_logged(tmp_path):
    """Training logs `peak_memory_gb` on GPU runs only (the process may be a torchrun or Slurm child): the
    run's timing.json takes the largest; a CPU run's log has none, and timing.json no key."""
    import json

    from mage_bench.run_job import _peak_memory

    lines = [{"step": 1, "loss": 3.0, "peak_memory_gb": 10.5}, {"step": 2, "loss": 2.9, "peak_memory_gb": 12.25},
             {"step": 3, "loss": 2.8}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert _peak_memory(tmp_path) == {"peak_memory_gb": 12.25}
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    assert _peak_memory(tmp_path) == {} and _peak_memory(tmp_path / "absent") == {}
