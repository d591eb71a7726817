"""Executors: how a sweep's runs are carried out, on existing engines only (no home-made scheduler).

Each run has two stages (`mage_bench.run_job`): training, then evaluation (generation and `eval all`)
on one process and one device. A DONE run is skipped, a trained one goes straight to evaluation, and
evaluation skips the evaluators whose records exist.
- `local`: both stages of a run in one process: one run after another in this process, or, with
  `executor.workers` > 1, that many runs side by side in worker processes (concurrent.futures, spawned),
  each with `executor.threads` threads (torch, BLAS, OpenMP) on the CPU. The shared work before the runs
  (tokenizer, references) stays in this process on its default threads. A tiny model's kernels are too
  small to keep two cores busy; two runs on one core each are ~1.4x the throughput of one run on two
  (2-core machine).
- `torchrun`: each run's training as a multi-process DDP job on this node (torch.distributed.run,
  `executor.nproc_per_node` processes), then its evaluation in a one-process subprocess, so that no GPU
  memory it cached stays behind while the next run trains.
- `slurm`: each run a Slurm training job through submitit (partition, GPUs, CPUs, memory and time from
  the spec's `executor.slurm` or the CLI) with one task per GPU (`tasks_per_node`) on every node; the
  tasks join one DDP process group from submitit's job environment and rank 0 writes. When it
  succeeds, the run's evaluation job follows: one task, one GPU (none when the spec asks for none), one
  node. Either job, preempted or timed out, is requeued and resumes (training from its checkpoint,
  evaluation from its samples and records). `executor.slurm.cluster: local` runs the same path on this
  machine with submitit's local executor (what the tests use).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mage_bench.errors import UserError
from mage_bench.registry import Registry
from mage_bench.run_job import EvaluateTask, RunTask, execute_run, sweep_evaluation, trained_already
from mage_bench.runs import DONE_FILE, SHARED_DIR
from mage_bench.threads import cpu_cores, cpu_threads, use_threads_from_now


@dataclass
class SweepContext:
    """What an executor needs of the sweep it carries out (made by `sweep.run_sweep`)."""

    spec: Any  # sweep_spec.SweepSpec
    runs_dir: Path
    report_dir: Path
    progress: bool
    device: str = "cpu"
    timings: dict[str, float] = field(default_factory=dict)
    differs: dict[str, Any] = field(default_factory=dict)  # mage_bench.confounds.check_confounds
    layout: dict[str, Any] = field(default_factory=dict)  # local: the workers and threads it ran with

    @property
    def cache(self) -> Path:
        return self.runs_dir / SHARED_DIR / "cache"


@dataclass(frozen=True)
class Executor:
    run: Callable[[SweepContext, list[Any]], list[dict[str, Any]]]  # (context, plans) -> outcomes, in order
    processes: Callable[[Any], int]  # (spec.executor) -> the training processes of each run (DDP world size)


EXECUTORS: Registry[Executor] = Registry("executor")


def _bar(ctx: SweepContext, total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"sweep {ctx.spec.name}", unit="run", file=sys.stderr, disable=not ctx.progress,
                position=0, dynamic_ncols=True)


def _one_after_another(ctx: SweepContext, plans: list[Any], train_command: list[str] | None = None,
                       isolate_evaluation: bool = False) -> list[dict[str, Any]]:
    outcomes = []
    with _bar(ctx, len(plans)) as bar:
        for plan in plans:
            bar.set_postfix_str(plan.name)
            outcomes.append(execute_run(plan, ctx.spec, ctx.runs_dir, ctx.device, progress=False,
                                        train_command=train_command, isolate_evaluation=isolate_evaluation))
            bar.update(1)
    return outcomes


def local_layout(options: Any, on_cpu: bool, pending: int) -> tuple[int, int | None]:
    """(worker processes, torch threads per run) of the local executor for `pending` runs still to do.

    Threads apply on the CPU only (a GPU run keeps torch's default for its host-side work) and never
    depend on `pending`: a resumed sweep computes with the threads its first runs had. Workers beyond the
    runs to do would idle, so they are capped by `pending`; "auto" is one per `threads` cores on the CPU
    and one on a GPU (the runs would share it).
    """
    threads = options.threads if on_cpu else None
    if options.workers == "auto":
        workers = cpu_cores() // (threads or cpu_cores()) if on_cpu else 1
    else:
        workers = options.workers
    return max(1, min(workers, pending)), threads


def _worker_init(threads: int | None, parent: int) -> None:
    _die_with_parent(parent)
    if threads is not None:
        use_threads_from_now(threads)


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this worker when the sweep's process dies, even by SIGKILL, so that no
    orphan goes on writing a run folder that a rerun of the sweep resumes at the same time."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request was made
        os._exit(1)


def side_by_side(ctx: SweepContext, plans: list[Any], workers: int, threads: int | None,
                 job: Callable[..., dict[str, Any]] = execute_run) -> list[dict[str, Any]]:
    """Each run's two stages (`job`, picklable) in one of `workers` spawned processes (spawn, not fork: a
    forked copy of a process whose OpenMP pool has run can hang); outcomes in plan order. A worker that
    dies (killed, out of memory) breaks the pool: every run not finished by then, the ones running beside
    it included, is recorded as failed with that error, and resumes on the next invocation."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    outcomes: dict[str, dict[str, Any]] = {}
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init, initargs=(threads, os.getpid()))
    try:
        with _bar(ctx, len(plans)) as bar:
            bar.set_postfix_str(f"{workers} runs side by side")
            futures = {pool.submit(job, plan, ctx.spec, ctx.runs_dir, ctx.device, False): plan for plan in plans}
            for future in as_completed(futures):
                plan = futures[future]
                try:
                    outcomes[plan.name] = future.result()
                except BrokenProcessPool as exc:  # a worker process died; execute_run records its own failures
                    outcomes[plan.name] = {"run": plan.name, "status": "failed",
                                           "error": f"worker process: {str(exc) or type(exc).__name__} (this "
                                                    f"run's worker or one beside it died; rerun the sweep to "
                                                    f"resume)"}
                except Exception as exc:  # the job's arguments or outcome did not cross the process boundary
                    outcomes[plan.name] = {"run": plan.name, "status": "failed",
                                           "error": f"worker process: {type(exc).__name__}: {exc}"}
                bar.update(1)
    except BaseException:
        # Interrupted (Ctrl-C, SIGTERM as an exception): no queued run may start, and the running ones stop
        # now rather than finish unseen; their checkpoints are atomic, so the next invocation resumes them.
        # No public way to stop workers before Python 3.14; taken before shutdown, which forgets them.
        running = list((pool._processes or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in running:
            process.terminate()
        raise
    pool.shutdown()
    return [outcomes[plan.name] for plan in plans]


def planned_layout(ctx: SweepContext, plans: list[Any]) -> tuple[int, int | None]:
    """The local executor's (workers, threads) for the runs of `plans` not DONE yet."""
    import torch

    def cpu(name: str) -> bool:  # never raises: a dry run of a GPU preset may be made on a laptop
        return name == "cpu" or (name == "auto" and not torch.cuda.is_available())

    on_cpu = cpu(ctx.device) and all(cpu(plan.config.train.device) for plan in plans)
    pending = sum(not (ctx.runs_dir / plan.name / DONE_FILE).is_file() for plan in plans)
    return local_layout(ctx.spec.executor, on_cpu, pending)


def run_local(ctx: SweepContext, plans: list[Any]) -> list[dict[str, Any]]:
    workers, threads = planned_layout(ctx, plans)
    ctx.layout = {"workers": workers, "threads": threads}
    if workers > 1:
        return side_by_side(ctx, plans, workers, threads)
    with cpu_threads(threads):
        return _one_after_another(ctx, plans)


def run_torchrun(ctx: SweepContext, plans: list[Any]) -> list[dict[str, Any]]:
    nproc = ctx.spec.executor.nproc_per_node
    if nproc < 1:
        raise UserError(f"executor.nproc_per_node must be >= 1, got {nproc}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "mage_bench.cli"]
    return _one_after_another(ctx, plans, train_command=command, isolate_evaluation=True)


def run_slurm(ctx: SweepContext, plans: list[Any]) -> list[dict[str, Any]]:
    """A training job per run (all submitted at once), each followed, once it succeeded, by its one-task
    evaluation job; outcomes in plan order, as the other executors."""
    try:
        import submitit
    except ImportError:
        raise UserError("the slurm executor needs submitit: pip install 'mage-bench[slurm]'") from None
    from submitit.helpers import as_completed

    options = ctx.spec.executor.slurm
    training = _slurm_executor(submitit, ctx, "", nodes=options.nodes, tasks=options.tasks,
                               gpus=options.gpus_per_node)
    evaluation = _slurm_executor(submitit, ctx, "-eval", nodes=1, tasks=1, gpus=min(options.gpus_per_node, 1))
    outcomes = {plan.name: {"run": plan.name, "status": "done", "skipped": True}
                for plan in plans if (ctx.runs_dir / plan.name / DONE_FILE).is_file()}
    todo = [plan for plan in plans if plan.name not in outcomes]
    # The device is chosen on the node that runs the job ("auto" there), not here.
    device = ctx.spec.eval.device
    evaluating: list[tuple[Any, dict[str, Any], Any]] = []  # (plan, its training outcome, evaluation job)

    def evaluate(plan: Any, trained: dict[str, Any]) -> None:
        job = sweep_evaluation(ctx.runs_dir / plan.name, ctx.spec, ctx.runs_dir, device)
        evaluating.append((plan, trained, evaluation.submit(EvaluateTask(), job)))

    with _bar(ctx, len(plans)) as bar:
        bar.update(len(outcomes))
        jobs = {}  # job id -> (plan, training job)
        for plan in todo:
            if trained_already(ctx.runs_dir / plan.name):  # by an earlier invocation: only its evaluation
                evaluate(plan, {"train_s": 0.0, "slurm_jobs": {}})
            else:
                job = training.submit(RunTask(), plan, ctx.spec, ctx.runs_dir, device)
                jobs[job.job_id] = (plan, job)
        # Each evaluation job is submitted as soon as its training job succeeded.
        for job in as_completed([job for _, job in jobs.values()], poll_frequency=_poll_seconds(options)):
            plan = jobs[job.job_id][0]
            trained = _job_outcome(plan, job, "training")  # rank 0's: the task that writes
            trained["slurm_jobs"] = {"train": job.job_id}
            if trained["status"] == "trained":
                evaluate(plan, trained)
            else:
                outcomes[plan.name] = trained
                bar.update(1)
        for plan, trained, job in evaluating:
            evaluated = _job_outcome(plan, job, "evaluation")
            outcomes[plan.name] = {**evaluated, "train_s": trained.get("train_s", 0.0),
                                   "slurm_jobs": {**trained["slurm_jobs"], "evaluate": job.job_id}}
            bar.update(1)
    return [outcomes[plan.name] for plan in plans]


def _slurm_executor(submitit: Any, ctx: SweepContext, suffix: str, nodes: int, tasks: int, gpus: int) -> Any:
    """A submitit executor for the sweep's jobs of one kind; the spec's partition, CPUs, memory and time."""
    options = ctx.spec.executor.slurm
    executor = submitit.AutoExecutor(folder=str(ctx.runs_dir / SHARED_DIR / "submitit"), cluster=options.cluster)
    executor.update_parameters(name=f"mage-{ctx.spec.name}{suffix}", timeout_min=options.timeout_min,
                               mem_gb=options.mem_gb, gpus_per_node=gpus, tasks_per_node=tasks,
                               cpus_per_task=options.cpus_per_task, nodes=nodes, slurm_partition=options.partition)
    return executor


def _poll_seconds(options: Any) -> float:
    """How often to ask whether training jobs ended: often on this machine, gently towards Slurm."""
    return 1.0 if options.cluster in ("local", "debug") else 15.0


def _job_outcome(plan: Any, job: Any, stage: str) -> dict[str, Any]:
    """The outcome the job returned (rank 0's), or a failure naming the job when the job itself died
    (a task failed, node failure, out of requeues)."""
    try:
        return dict(job.results()[0])
    except Exception as exc:
        detail = str(exc).splitlines()[0] if str(exc) else repr(exc)
        return {"run": plan.name, "status": "failed", "error": f"slurm {stage} job {job.job_id}: {detail}"}


EXECUTORS.register("local")(Executor(run_local, processes=lambda options: 1))
EXECUTORS.register("torchrun")(Executor(run_torchrun, processes=lambda options: options.nproc_per_node))
EXECUTORS.register("slurm")(Executor(run_slurm, processes=lambda options: options.slurm.nodes * options.slurm.tasks))
