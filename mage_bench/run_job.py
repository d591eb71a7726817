"""One run of a sweep in two stages, each its own job where the executor allows it.

- Training (`train_stage`): train, resuming, in this process, under torchrun, or in every task of a Slurm
  job (`RunTask`). Rank 0 then writes the run's sweep meta and `timing.json` with `train_s`: the mark that
  training finished, so a rerun goes straight to evaluation.
- Evaluation (`evaluate_stage`): one process on one device: the run's samples (those already there are
  kept), `eval all` with resume (evaluators whose records exist with the same inputs are skipped), the
  stage times, and `DONE`, written last. It runs in the process that trained the run (the local executor:
  the sweep's process or its worker), as a subprocess
  `python -m mage_bench.run_job evaluate ...` (torchrun: the GPU memory it cached is gone when it ends)
  or as a one-task Slurm job (`EvaluateTask`, requeued on preemption). Everything it needs travels in an
  `EvaluationJob`: the run folder, the sweep's `eval` settings, the sweep's name, the FID cache, the device.

Failures of either stage are recorded in `FAILED`, not raised. `execute_run` chains the two stages for
the local and torchrun executors. This module imports nothing of the sweep machinery above it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mage_bench.errors import UserError
from mage_bench.runs import DONE_FILE, FAILED_FILE, METRICS_FILE, RUN_META, SHARED_DIR, TIMING_FILE

# The generation metrics a sweep computes for every run and for its real held-out reference; their
# extractor weights and backend are checked against these before the first run starts.
GENERATION_FLAGS = ("fid", "isc", "kid")
EVALUATION_STAGES = ("generation_s", "evaluation_s")  # timing.json keys written by the evaluation stage


@dataclass(frozen=True)
class EvaluationJob:
    """Everything the evaluation stage of one run needs: picklable (a Slurm job) and an argv (a subprocess)."""

    run_dir: Path
    settings: Any  # config.EvalConfig: the sweep spec's `eval` section
    sweep: str  # the sweep's name, written into every record
    cache: Path  # the sweep's shared FID reference cache
    device: str  # auto | cpu | cuda: resolved where the job runs

    def argv(self) -> list[str]:
        from mage_bench.config import to_dict

        return ["--run", str(self.run_dir), "--sweep", self.sweep, "--cache", str(self.cache),
                "--device", self.device, "--eval", json.dumps(to_dict(self.settings))]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EvaluationJob:
        from mage_bench.config import EvalConfig, from_dict

        try:
            layer = json.loads(args.eval)
        except json.JSONDecodeError as exc:
            raise UserError(f"--eval is not JSON ({exc.msg}); pass the sweep's eval settings as one JSON object") \
                from None
        return cls(Path(args.run), from_dict(EvalConfig, layer, "eval"), args.sweep, Path(args.cache), args.device)


def sweep_evaluation(run_dir: Path, spec: Any, runs_dir: Path, device: str) -> EvaluationJob:
    """The evaluation job of a run folder of the sweep `spec` whose runs live in `runs_dir`."""
    return EvaluationJob(run_dir, spec.eval, spec.name, runs_dir / SHARED_DIR / "cache", device)


def _digits_cnn_pending(extractor: str, settings: Any, dry_run: bool) -> str | None:
    """What a dry run shows for digits-cnn weights still to be trained at their default place (it trains
    nothing); None when they exist, are given, another extractor is used, or this is no dry run."""
    from mage_bench.eval.extractors import DIGITS_CNN_DIR, DIGITS_CNN_FILE

    weights = DIGITS_CNN_DIR / DIGITS_CNN_FILE
    if dry_run and extractor == "digits-cnn" and not settings.weights and not weights.is_file():
        return f"{weights} (digits-cnn: trained there on first use)"
    return None


def check_evaluation_inputs(settings: Any, reals: Iterable[str], dry_run: bool = False) -> list[str]:
    """The FID extractor weights of each real side (data set) the sweep evaluates against, resolved with
    the backend and metric flags before anything runs (no run loaded; downloaded now when missing and
    possible, never in a dry run); a `UserError` naming the missing file otherwise. Returns the weights,
    for the dry run to show.

    digits-cnn weights are trained locally on first use (~15 s, no network): a dry run only says so."""
    from mage_bench.eval.generation import check_generation_inputs, default_extractor

    weights = []
    if settings.profile is not None:  # the profile's extractor weights, checked against its pinned sha256
        from mage_bench.eval.profile_eval import check_profile_inputs
        from mage_bench.eval.runner import profile_for_runs

        profile = profile_for_runs(settings.profile)
        if settings.decode_grid:  # a bad grid fails before any training
            from mage_bench.eval.decode_grid import parse_decode

            try:
                parse_decode(settings.decode_grid)
            except UserError as exc:
                raise UserError(f"eval.decode_grid: {exc}") from None
        for real in dict.fromkeys(reals):
            pending = _digits_cnn_pending(profile.extractor, settings, dry_run)
            if pending:
                weights.append(pending)
                continue
            try:
                weights.append(str(check_profile_inputs(profile, real, settings.weights, fake_is_run=True,
                                                        allow_download=not dry_run)[1]))
            except UserError as exc:
                raise UserError(f"{exc} (in a sweep spec: eval.profile and eval.weights)") from None
        return list(dict.fromkeys(weights))
    for real in dict.fromkeys(reals):
        pending = _digits_cnn_pending(settings.extractor or default_extractor(real), settings, dry_run)
        if pending:
            weights.append(pending)
        else:
            try:  # a dry run fetches nothing; a real sweep downloads missing weights now, before any training
                weights.append(str(check_generation_inputs(settings, real, GENERATION_FLAGS,
                                                           allow_download=not dry_run)))
            except UserError as exc:  # the message speaks of `eval fid`'s flags; a sweep sets the spec's keys
                raise UserError(f"{exc} (in a sweep spec: eval.weights, readable where the sweep is launched; "
                                "the sweep itself downloads them before its first run when it can)") from None
    return list(dict.fromkeys(weights))


# --------------------------------------------------------------------------------------------
# Both stages, one after the other (the local and torchrun executors)


def execute_run(plan: Any, spec: Any, runs_dir: Path, device: str, progress: bool,
                train_command: list[str] | None = None, isolate_evaluation: bool = False) -> dict[str, Any]:
    """Train (resuming) and evaluate one run, marking it DONE; failures are recorded, not raised.

    A DONE run is skipped, a trained one goes straight to evaluation. `train_command`: train through this
    launcher (torchrun) instead of in this process. `isolate_evaluation`: evaluate in a one-process
    subprocess, so that nothing it caches on the GPU outlives it (the torchrun executor).
    """
    run_dir = runs_dir / plan.name
    if (run_dir / DONE_FILE).is_file():
        return {"run": plan.name, "status": "done", "skipped": True}
    trained = train_stage(plan, spec, run_dir, train_command)
    if trained["status"] != "trained":
        return trained
    job = sweep_evaluation(run_dir, spec, runs_dir, device)
    evaluated = evaluate_subprocess(job) if isolate_evaluation else evaluate_stage(job, progress)
    return {**evaluated, "train_s": trained["train_s"]}


# --------------------------------------------------------------------------------------------
# Training


def train_stage(plan: Any, spec: Any, run_dir: Path, train_command: list[str] | None = None,
                rank: int = 0) -> dict[str, Any]:
    """Train the run (resuming); rank 0 then records its meta and training time. Returns the outcome:
    status `trained` (with `train_s`: 0 when it was trained already) or `failed` (with `error`).

    `rank`: this process's rank when every process of a DDP job calls this (a Slurm job's tasks): all
    of them train; only rank 0 writes.
    """
    from mage_bench.io import atomic_write_json
    from mage_bench.train import train

    if rank == 0:
        (run_dir / FAILED_FILE).unlink(missing_ok=True)
    if trained_already(run_dir):  # every rank reads the same file: all skip, or all train together
        return {"run": plan.name, "status": "trained", "train_s": 0.0}
    try:
        tic = time.perf_counter()
        if train_command is None:
            train(plan.config, run_dir, resume=True, progress=False)
            _leave_process_group()
        else:
            _train_subprocess(plan, run_dir, train_command)
        train_s = time.perf_counter() - tic
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run_dir / RUN_META, plan.meta(spec))
            timing = {"train_s": train_s, **_peak_memory(run_dir)}
            atomic_write_json(run_dir / TIMING_FILE, timing)  # last: training is finished
    except Exception as exc:  # recorded and reported; the sweep goes on and its exit code says so
        error = _error_line(exc)
        if rank == 0:
            _record_failure(run_dir, plan.meta(spec), error)
        return {"run": plan.name, "status": "failed", "error": error}
    return {"run": plan.name, "status": "trained", "train_s": train_s, "rank": rank}


def trained_already(run_dir: Path) -> bool:
    """Whether the training stage finished (its time is recorded) and only evaluation may be missing."""
    return "train_s" in read_timing(run_dir)


def _leave_process_group() -> None:
    """After DDP training in this process (a Slurm task): the group is not needed any more."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _peak_memory(run_dir: Path) -> dict[str, float]:
    """{"peak_memory_gb": the largest GPU allocator high-water mark rank 0 logged}, from metrics.jsonl (it is
    logged by the training process, which may be a torchrun or Slurm child of this one); {} on CPU."""
    from mage_bench.io import read_jsonl

    peaks = [r["peak_memory_gb"] for r in read_jsonl(run_dir / METRICS_FILE) if r.get("peak_memory_gb") is not None]
    return {"peak_memory_gb": max(peaks)} if peaks else {}


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


class RunTask:
    """The training job of a run, executed by every Slurm task (submitted through submitit).

    The task turns the job environment (submitit's JobEnvironment: rank, local rank, world size, the
    first node as the rendezvous) into torch.distributed's variables, so `train` joins one process
    group of every task of the job, then runs `train_stage` as that rank. On preemption or timeout
    submitit calls `checkpoint`, which requeues the same call: training resumes from its checkpoint.
    """

    def __call__(self, plan: Any, spec: Any, runs_dir: Path, device: str) -> dict[str, Any]:
        from submitit.helpers import TorchDistributedEnvironment

        env = TorchDistributedEnvironment()
        if env.world_size > 1:
            # Each task sees the node's GPUs; train picks cuda:LOCAL_RANK, as under torchrun.
            env.export(set_cuda_visible_devices=False, overwrite=True)
        return train_stage(plan, spec, Path(runs_dir) / plan.name, rank=env.rank)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(RunTask(), *args, **kwargs)


# --------------------------------------------------------------------------------------------
# Evaluation


def evaluate_stage(job: EvaluationJob, progress: bool = False) -> dict[str, Any]:
    """Generate and evaluate a trained run (resuming), then write its stage times and DONE, last.
    Returns the outcome: status `done` (with the stage times) or `failed` (with `error`, also in FAILED)."""
    from mage_bench.io import atomic_write_json, atomic_write_text
    from mage_bench.runs import resolve_device

    run_dir = job.run_dir
    if (run_dir / DONE_FILE).is_file():  # e.g. a requeued job whose first attempt had finished
        return {"run": run_dir.name, "status": "done", "skipped": True}
    (run_dir / FAILED_FILE).unlink(missing_ok=True)
    timing = read_timing(run_dir)
    try:
        device = resolve_device(job.device)
        timing.update(evaluate_run_folder(run_dir, job.settings, job.sweep, job.cache, device, progress))
    except Exception as exc:  # recorded and reported, as a training failure
        error = _error_line(exc)
        _record_failure(run_dir, _read_json(run_dir / RUN_META), error)
        return {"run": run_dir.name, "status": "failed", "error": error}
    atomic_write_json(run_dir / TIMING_FILE, timing)
    atomic_write_text(run_dir / DONE_FILE, json.dumps({"finished_at": time.time()}) + "\n")  # written last
    return {"run": run_dir.name, "status": "done", "skipped": False,
            **{key: timing[key] for key in EVALUATION_STAGES}}


def evaluate_run_folder(run_dir: Path, settings: Any, sweep: str, cache: Path, device: str,
                        progress: bool) -> dict[str, float]:
    """Generate the run's samples (keeping those there), then `eval all` on them on `device`, skipping
    evaluators whose records exist with the same inputs; returns the two stages' times."""
    import dataclasses

    from mage_bench.eval.generation import generate_run_samples
    from mage_bench.eval.runner import evaluate_all, num_samples_for
    from mage_bench.runs import load_run

    run = load_run(run_dir, device)
    tic = time.perf_counter()
    if settings.profile is not None:  # the profile's count and decoding settings, into its samples folder
        from mage_bench.eval.profile_eval import generate_for_profile

        settings = dataclasses.replace(settings, device=device)
        if not settings.stream_samples:  # streamed images are generated inside the evaluation's feature pass
            generate_for_profile(run, settings.profile, run.config.data.name, cache, device, progress)
        samples = None
    else:
        settings = dataclasses.replace(settings, device=device, num_samples=num_samples_for(run, settings))
        samples = generate_run_samples(run, settings.num_samples, device, progress)
    generated = time.perf_counter()
    evaluate_all(run, settings, flags=GENERATION_FLAGS, cache_dir=cache, progress=progress, sweep=sweep,
                 samples=samples, resume=True)
    return {"generation_s": generated - tic, "evaluation_s": time.perf_counter() - generated}


def evaluate_subprocess(job: EvaluationJob) -> dict[str, Any]:
    """`evaluate_stage` in a fresh one-process Python (`python -m mage_bench.run_job evaluate`); the outcome
    is read back from the run folder (DONE and timing.json, or FAILED)."""
    command = [sys.executable, "-m", "mage_bench.run_job", "evaluate", *job.argv()]
    code = subprocess.run(command, check=False).returncode
    run_dir = job.run_dir
    if (run_dir / DONE_FILE).is_file():
        timing = read_timing(run_dir)
        return {"run": run_dir.name, "status": "done", "skipped": False,
                **{key: timing.get(key, 0.0) for key in EVALUATION_STAGES}}
    error = _read_json(run_dir / FAILED_FILE).get("error")
    if not error:  # it died before it could record why (killed, out of memory)
        error = f"the evaluation subprocess exited with code {code}"
        _record_failure(run_dir, _read_json(run_dir / RUN_META), error)
    return {"run": run_dir.name, "status": "failed", "error": error}


class EvaluateTask:
    """The evaluation job of a run: one Slurm task (one GPU, or none), submitted after its training job.

    On preemption or timeout submitit calls `checkpoint`, which requeues the same call: the samples
    already generated and the evaluators with records are kept, the rest is computed.
    """

    def __call__(self, job: EvaluationJob) -> dict[str, Any]:
        return evaluate_stage(job, progress=False)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(EvaluateTask(), *args, **kwargs)


def release_accelerator_memory() -> None:
    """Give back what PyTorch's allocator caches on the GPU, so a process that evaluated (the sweep's
    references) does not hold it while runs train in other processes on the same GPU."""
    import gc

    if "torch" not in sys.modules:
        return
    import torch

    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Small helpers


def _error_line(exc: BaseException) -> str:
    """The first line of an expected failure; the type too for anything else (likely a bug)."""
    from mage_bench.train import TrainingFailed

    expected = isinstance(exc, (TrainingFailed, UserError, subprocess.CalledProcessError))
    first = (str(exc).splitlines() or [""])[0]
    return first if expected else f"{type(exc).__name__}: {first}"


def _record_failure(run_dir: Path, meta: dict[str, Any], error: str) -> None:
    from mage_bench.io import atomic_write_json

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / FAILED_FILE, {**meta, "error": error})


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def read_timing(run_dir: Path) -> dict[str, float]:
    """A run's stage times (timing.json; {} before training finished)."""
    return _read_json(run_dir / TIMING_FILE)


# --------------------------------------------------------------------------------------------
# Entry point of the evaluation subprocess


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mage_bench.run_job",
        description="Internal: the evaluation stage of one run folder of a sweep, as the torchrun executor "
                    "launches it (generation, then eval all with resume; DONE or FAILED). Exit 0 when the "
                    "run is DONE, 1 when it failed (see RUN_DIR/FAILED), 2 on bad arguments.")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    p = sub.add_parser("evaluate", help="evaluate one trained run folder of a sweep")
    p.add_argument("--run", required=True, help="the run folder")
    p.add_argument("--sweep", required=True, help="the sweep's name (written into the records)")
    p.add_argument("--cache", required=True, help="the sweep's FID reference cache (RUNS/_shared/cache)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--eval", required=True, help="the sweep's eval settings as one JSON object")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        job = EvaluationJob.from_args(args)
    except UserError as exc:
        print(f"mage-bench: error: {exc}", file=sys.stderr)
        return 2
    return 0 if evaluate_stage(job, progress=False)["status"] == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
