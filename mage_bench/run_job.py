"""One run of a sweep, start to finish: train (resuming), generate, evaluate, mark DONE or FAILED.

Every executor calls `execute_run` (in this process, under torchrun for the training, or in every task
of a Slurm job through `RunTask`), so this module imports nothing of the sweep machinery above it.
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
                train_command: list[str] | None = None, rank: int = 0) -> dict[str, Any]:
    """Train (resuming), generate, evaluate one run and mark it DONE; failures are recorded, not raised.

    `train_command`: run training as this subprocess instead (the torchrun executor); the rest runs here.
    `rank`: this process's rank when every process of a DDP job calls this (the slurm executor): all of
    them train; only rank 0 writes FAILED, evaluates and marks DONE, the others return after training.
    """
    from mage_bench.io import atomic_write_json, atomic_write_text
    from mage_bench.runs import resolve_device
    from mage_bench.train import TrainingFailed, train

    device = resolve_device(device)
    run_dir = runs_dir / plan.name
    if (run_dir / DONE_FILE).is_file():
        return {"run": plan.name, "status": "done", "skipped": True}
    if rank == 0:
        (run_dir / FAILED_FILE).unlink(missing_ok=True)
    timing: dict[str, float] = {}
    try:
        tic = time.perf_counter()
        if train_command is None:
            train(plan.config, run_dir, resume=True, progress=progress)
            _leave_process_group()
        else:
            _train_subprocess(plan, run_dir, train_command)
        timing["train_s"] = time.perf_counter() - tic
        if rank != 0:
            return {"run": plan.name, "status": "trained", "rank": rank}
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / RUN_META, plan.meta(spec))
        timing.update(evaluate_run_folder(run_dir, spec, runs_dir / SHARED_DIR / "cache", device, progress))
    except Exception as exc:  # recorded and reported; the sweep goes on and its exit code says so
        expected = isinstance(exc, (TrainingFailed, UserError, subprocess.CalledProcessError))
        lines = str(exc).splitlines() or [""]
        error = lines[0] if expected else f"{type(exc).__name__}: {lines[0]}"
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run_dir / FAILED_FILE, {**plan.meta(spec), "error": error})
        return {"run": plan.name, "status": "failed", "error": error}
    atomic_write_json(run_dir / TIMING_FILE, timing)
    atomic_write_text(run_dir / DONE_FILE, json.dumps({"finished_at": time.time()}) + "\n")  # written last
    return {"run": plan.name, "status": "done", "skipped": False, **timing}


def _leave_process_group() -> None:
    """After DDP training in this process (a Slurm task): the group is not needed for evaluation."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class RunTask:
    """What each Slurm task of a run's job executes (submitted through submitit).

    The task turns the job environment (submitit's JobEnvironment: rank, local rank, world size, the
    first node as the rendezvous) into torch.distributed's variables, so `train` joins one process
    group of every task of the job, then runs `execute_run` as that rank. On preemption or timeout
    submitit calls `checkpoint`, which requeues the same call: training resumes from its checkpoint and
    the records are rewritten whole, never duplicated.
    """

    def __call__(self, plan: Any, spec: Any, runs_dir: Path, device: str) -> dict[str, Any]:
        from submitit.helpers import TorchDistributedEnvironment

        env = TorchDistributedEnvironment()
        if env.world_size > 1:
            # Each task sees the node's GPUs; train picks cuda:LOCAL_RANK, as under torchrun.
            env.export(set_cuda_visible_devices=False, overwrite=True)
        return execute_run(plan, spec, runs_dir, device, progress=False, rank=env.rank)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(RunTask(), *args, **kwargs)


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
