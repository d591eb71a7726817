"""The local executor's runs side by side (`executor.workers`) with a fixed thread count per run
(`executor.threads`): same numbers as one run at a time, the layout recorded, bad settings refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from test_sweep import micro_spec  # noqa: I001  (tests/ is on the path)

from mage_bench import executors
from mage_bench.cli import main
from mage_bench.errors import ConfigError
from mage_bench.schema import from_dict
from mage_bench.sweep_spec import ExecutorOptions


def _results(report: Path) -> pd.DataFrame:
    frame = pd.read_csv(report / "results.csv")
    return frame.drop(columns=["created_at"]).sort_values(["run", "evaluator", "metric", "k", "shots"]) \
        .reset_index(drop=True)


def test_runs_side_by_side_give_the_numbers_of_one_run_at_a_time(tmp_path, tiny_tokenizer_dir, digits_cnn, capsys):
    """Two workers of one thread each and one worker of one thread: the same records to the last bit (the
    thread count, not the worker count, decides them), the layout in sweep.json, the threads in launch.json."""
    threads_before = torch.get_num_threads()
    reports = {}
    for workers in (2, 1):
        (tmp_path / f"w{workers}").mkdir()
        path = micro_spec(tmp_path / f"w{workers}", tiny_tokenizer_dir, digits_cnn,
                          executor={"name": "local", "workers": workers, "threads": 1})
        runs, reports[workers] = tmp_path / f"w{workers}" / "runs", tmp_path / f"w{workers}" / "report"
        assert main(["sweep", str(path), "--runs", str(runs), "--out", str(reports[workers])]) == 0
        out = capsys.readouterr().out
        assert ("summed over 2 runs side by side" in out) == (workers == 2)
        sweep = json.loads((runs / "sweep.json").read_text())
        assert sweep["executor"] == {"name": "local", "workers": workers, "threads": 1}
        launches = [json.loads(p.read_text()) for p in runs.glob("*/launch.json")]
        assert len(launches) == 2 and all(launch["cpu_threads"] == 1 for launch in launches)
        assert all("cpu_threads_before" not in launch for launch in launches)
    pd.testing.assert_frame_equal(_results(reports[2]), _results(reports[1]))
    assert torch.get_num_threads() == threads_before  # the in-process run restores this process's threads


def _dies_on_second(plan, spec, runs_dir, device, progress):
    """A picklable stand-in for execute_run whose worker dies on the second run (as the OOM killer would)."""
    if plan.name == "second":
        os._exit(3)
    return {"run": plan.name, "status": "done", "threads": torch.get_num_threads()}


class _Plan:
    def __init__(self, name: str) -> None:
        self.name = name


def test_a_dead_worker_fails_its_run_and_the_sweep_returns(tmp_path):
    from mage_bench.sweep_spec import SweepSpec

    ctx = executors.SweepContext(SweepSpec(name="x"), tmp_path, tmp_path / "report", progress=False)
    plans = [_Plan("first"), _Plan("second")]
    first, second = executors.side_by_side(ctx, plans, workers=1, threads=1, job=_dies_on_second)
    assert first == {"run": "first", "status": "done", "threads": 1}  # the worker ran with the asked threads
    assert second["status"] == "failed" and second["error"].startswith("worker process: ")


def test_local_layout(monkeypatch):
    monkeypatch.setattr(executors, "cpu_cores", lambda: 8)
    layout = executors.local_layout
    assert layout(ExecutorOptions(workers="auto", threads=2), on_cpu=True, pending=12) == (4, 2)
    assert layout(ExecutorOptions(workers="auto", threads=2), on_cpu=True, pending=3) == (3, 2)  # capped
    assert layout(ExecutorOptions(workers="auto", threads=None), on_cpu=True, pending=12) == (1, None)
    assert layout(ExecutorOptions(workers="auto", threads=1), on_cpu=False, pending=12) == (1, None)  # a GPU
    assert layout(ExecutorOptions(workers=3, threads=1), on_cpu=False, pending=12) == (3, None)
    assert layout(ExecutorOptions(workers=4, threads=1), on_cpu=True, pending=0) == (1, 1)  # nothing left
    assert layout(ExecutorOptions(), on_cpu=True, pending=12) == (1, None)  # the defaults: as before


@pytest.mark.parametrize(("executor", "message"), [
    ({"workers": 0}, "executor.workers must be a positive integer or 'auto', not 0"),
    ({"workers": "many"}, "executor.workers must be a positive integer or 'auto', not 'many'"),
    ({"threads": 0}, "executor.threads must be a positive integer"),
    ({"threads": "auto"}, "executor.threads must be an integer"),
])
def test_bad_local_settings_are_one_line_errors(tmp_path, tiny_tokenizer_dir, digits_cnn, capsys, executor, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        from_dict(ExecutorOptions, executor, "executor")
    path = micro_spec(tmp_path, tiny_tokenizer_dir, digits_cnn, executor={"name": "local", **executor})
    assert main(["sweep", str(path), "--runs", str(tmp_path / "runs"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_cli_workers_and_threads_override_the_spec(tmp_path, tiny_tokenizer_dir, digits_cnn, capsys):
    path = micro_spec(tmp_path, tiny_tokenizer_dir, digits_cnn, seeds=(0, 1))
    runs = str(tmp_path / "runs")
    assert main(["sweep", str(path), "--runs", runs, "--dry-run", "--workers", "3", "--threads", "1"]) == 0
    assert "with the local executor (3 runs side by side, 1 torch thread each)" in capsys.readouterr().out
    assert main(["sweep", str(path), "--runs", runs, "--dry-run"]) == 0  # the spec's: one at a time, default threads
    assert "with the local executor (one run at a time)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", str(path), "--runs", runs, "--dry-run", "--workers", "two"])
    assert exit_info.value.code == 2 and "a positive integer or auto, not 'two'" in capsys.readouterr().err
    assert main(["sweep", str(path), "--runs", runs, "--dry-run", "--threads", "0"]) == 2
    assert "executor.threads must be a positive integer" in capsys.readouterr().err
    assert main(["sweep", str(path), "--runs", runs, "--dry-run", "--executor", "torchrun", "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--workers lay out the local executor's runs; the torchrun executor ignores them" in err
    assert len(err.splitlines()) == 1


def test_the_bundled_sweeps_run_one_core_per_run():
    """The built-in specs' local executor: runs side by side on one thread each (a tiny model keeps one core
    busy, not two), so their numbers do not depend on the machine's core count."""
    for spec in ("masking", "contrastive", "drop", "masking-x-contrastive"):
        raw = yaml.safe_load((Path(executors.__file__).parents[1] / "experiments" / f"{spec}.yaml").read_text())
        assert raw["executor"] == {"name": "local", "workers": "auto", "threads": 1}, spec


def test_a_resume_on_other_threads_keeps_the_earlier_count(tmp_path):
    from mage_bench.train import cpu_threads_record

    (tmp_path / "launch.json").write_text(json.dumps({"world_size": 1, "cpu_threads": 2}))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cpu_threads_record(tmp_path) == {"cpu_threads": 1, "cpu_threads_before": [2]}
        assert cpu_threads_record(None) == {"cpu_threads": 1}
        (tmp_path / "launch.json").write_text(json.dumps({"cpu_threads": 1, "cpu_threads_before": [2]}))
        assert cpu_threads_record(tmp_path) == {"cpu_threads": 1, "cpu_threads_before": [2]}
        (tmp_path / "launch.json").write_text(json.dumps({"world_size": 1}))  # trained before this was recorded
        assert cpu_threads_record(tmp_path) == {"cpu_threads": 1, "cpu_threads_before": ["unknown"]}
    finally:
        torch.set_num_threads(before)


def test_a_gpu_sweep_runs_one_at_a_time_and_its_dry_run_works_without_a_gpu(tmp_path, tiny_tokenizer_dir,
                                                                            digits_cnn, capsys):
    path = micro_spec(tmp_path, tiny_tokenizer_dir, digits_cnn, executor={"name": "local", "workers": "auto",
                                                                         "threads": 1})
    raw = yaml.safe_load(path.read_text())
    raw["run"]["train"]["device"] = "cuda"
    path.write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(path), "--runs", str(tmp_path / "runs"), "--dry-run"]) == 0
    assert "with the local executor (one run at a time)" in capsys.readouterr().out


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_a_stopped_side_by_side_sweep_leaves_no_worker_and_the_rerun_gives_the_same_results(
        tmp_path, tiny_tokenizer_dir, digits_cnn):
    """The sweep's process interrupted (SIGINT) or killed (SIGKILL) while its workers train: the workers stop
    with it (no orphan writes the run folders a rerun resumes), and the rerun's results equal an
    uninterrupted sweep's."""
    import signal
    import subprocess
    import sys
    import time

    path = micro_spec(tmp_path, tiny_tokenizer_dir, digits_cnn, executor={"name": "local", "workers": 2, "threads": 1},
                      eval_extra={"references": False})  # four sweeps: only what the runs do
    (tmp_path / "long").mkdir()  # runs of minutes: a worker left to finish its run would outlive any deadline
    long = micro_spec(tmp_path / "long", tiny_tokenizer_dir, digits_cnn, eval_extra={"references": False},
                      executor={"name": "local", "workers": 2, "threads": 1})
    raw = yaml.safe_load(long.read_text())
    raw["run"]["train"].update(steps=100_000, checkpoint_every=50_000)
    long.write_text(yaml.safe_dump(raw))

    def command(spec: Path, name: str) -> list[str]:
        return [sys.executable, "-m", "mage_bench.cli", "sweep", str(spec), "--quiet", "--runs", str(tmp_path / name),
                "--out", str(tmp_path / f"r{name}")]

    def stop_while_training(sig: int, spec: Path, name: str) -> int:
        """Start the sweep into a fresh NAME/, send `sig` to its process alone once its workers train; its
        exit code, which must come within 30 s, and no worker may outlive it by more than 3 s."""
        process = subprocess.Popen(command(spec, name))
        deadline = time.monotonic() + 300
        while not list((tmp_path / name).glob("*/metrics.jsonl")):  # the workers are training
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        workers = _children(process.pid)
        assert len(workers) >= 2  # two spawned workers (and multiprocessing's resource tracker)
        process.send_signal(sig)
        code = process.wait(timeout=30)
        deadline = time.monotonic() + 3
        while any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
                  for pid in workers if Path(f"/proc/{pid}/stat").exists()):
            assert time.monotonic() < deadline, f"a worker outlived the sweep's process (signal {sig})"
            time.sleep(0.05)
        assert not list((tmp_path / f"r{name}").glob("results.csv"))
        return code

    assert stop_while_training(signal.SIGINT, long, "b") != 0  # Ctrl-C: the workers are stopped, not waited for
    assert not list((tmp_path / "b").glob("*/FAILED"))  # an interruption is no failure
    assert stop_while_training(signal.SIGKILL, path, "c") == -signal.SIGKILL  # the kernel stops the workers
    subprocess.run(command(path, "a"), check=True)
    subprocess.run(command(path, "c"), check=True)  # the rerun resumes and completes the killed sweep
    pd.testing.assert_frame_equal(_results(tmp_path / "ra"), _results(tmp_path / "rc"))


def test_training_records_its_threads_and_a_resume_on_other_threads(tmp_path, tiny_run_layer):
    from mage_bench.config import RunConfig, resolve_config
    from mage_bench.threads import cpu_threads
    from mage_bench.train import train

    config = resolve_config(RunConfig, tiny_run_layer)
    with cpu_threads(2):
        train(config, tmp_path / "run", progress=False, stop_at=3)
    assert json.loads((tmp_path / "run" / "launch.json").read_text())["cpu_threads"] == 2
    with cpu_threads(1):
        train(config, tmp_path / "run", resume=True, progress=False)
    launch = json.loads((tmp_path / "run" / "launch.json").read_text())
    assert launch["cpu_threads"] == 1 and launch["cpu_threads_before"] == [2]
    with cpu_threads(2):  # finished: a no-op resume trains nothing and leaves the record as it was
        train(config, tmp_path / "run", resume=True, progress=False)
    assert json.loads((tmp_path / "run" / "launch.json").read_text()) == launch
