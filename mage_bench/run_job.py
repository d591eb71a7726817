"""One run of a sweep, start to finish: train (resuming), generate, evaluate, mark DONE or FAILED.

Every executor calls `execute_run` (in this process, under torchrun for the training, or as a Slurm
job), so this module imports nothing of the sweep machinery above it.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from mage_bench.errors import UserError
from mage_bench.runs import DONE_FILE, FAILED_FILE, RUN_META, SHARED_DIR, TIMING_FILE


def execute_run(plan: Any, spec: Any, runs_dir: Path, device: str, progress: bool,
                train_command: list[str] | None = None) -> dict[str, Any]:
    """Train (resuming), generate, evaluate one run and mark it DONE; failures are recorded, not raised.

    `train_command`: run training as this subprocess instead (the torchrun executor); the rest runs here.
    """
    from mage_bench.io import atomic_write_json, atomic_write_text
    from mage_bench.runs import resolve_device
    from mage_bench.train import TrainingFailed, train

    device = resolve_device(device)
    run_dir = runs_dir / plan.name
    if (run_dir / DONE_FILE).is_file():
        return {"run": plan.name, "status": "done", "skipped": True}
    (run_dir / FAILED_FILE).unlink(missing_ok=True)
    timing: dict[str, float] = {}
    try:
        tic = time.perf_counter()
        if train_command is None:
            train(plan.config, run_dir, resume=True, progress=progress)
        else:
            _train_subprocess(plan, run_dir, train_command)
        timing["train_s"] = time.perf_counter() - tic
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / RUN_META, plan.meta(spec))
        timing.update(evaluate_run_folder(run_dir, spec, runs_dir / SHARED_DIR / "cache", device, progress))
    except Exception as exc:  # recorded and reported; the sweep goes on and its exit code says so
        expected = isinstance(exc, (TrainingFailed, UserError, subprocess.CalledProcessError))
        lines = str(exc).splitlines() or [""]
        error = lines[0] if expected else f"{type(exc).__name__}: {lines[0]}"
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / FAILED_FILE, {**plan.meta(spec), "error": error})
        return {"run": plan.name, "status": "failed", "error": error}
    atomic_write_json(run_dir / TIMING_FILE, timing)
    atomic_write_text(run_dir / DONE_FILE, json.dumps({"finished_at": time.time()}) + "\n")  # written last
    return {"run": plan.name, "status": "done", "skipped": False, **timing}


def evaluate_run_folder(run_dir: Path, spec: Any, cache: Path, device: str, progress: bool) -> dict[str, float]:
    """Generate the run's samples once, then `eval all` on them on `device`; returns the two stages' times."""
    import dataclasses

    from mage_bench.eval.generation import generate_run_samples
    from mage_bench.eval.runner import evaluate_all, num_samples_for
    from mage_bench.runs import load_run

    run = load_run(run_dir, device)
    settings = dataclasses.replace(spec.eval, device=device, num_samples=num_samples_for(run, spec.eval))
    tic = time.perf_counter()
    samples = generate_run_samples(run, settings.num_samples, device, progress)
    generated = time.perf_counter()
    evaluate_all(run, settings, cache_dir=cache, progress=progress, sweep=spec.name, samples=samples)
    return {"generation_s": generated - tic, "evaluation_s": time.perf_counter() - generated}


def _train_subprocess(plan: Any, run_dir: Path, command: list[str]) -> None:
    """Training through a launcher (torchrun): the resolved config goes through a file."""
    import tempfile

    from mage_bench.config import dump_yaml

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        handle.write(dump_yaml(plan.config))
    try:
        subprocess.run([*command, "train", "--config", handle.name, "--out", str(run_dir), "--resume", "--quiet"],
                       check=True)
    finally:
        Path(handle.name).unlink(missing_ok=True)
