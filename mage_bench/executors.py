"""Executors: how a sweep's runs are carried out, on existing engines only (no home-made scheduler).

- `local`: one run after another in this process.
- `torchrun`: each run's training as a multi-process DDP job on this node (torch.distributed.run,
  `executor.nproc_per_node` processes); generation and evaluation then run here.
- `slurm`: each run a Slurm job through submitit (partition, GPUs, CPUs, memory, time from the spec's
  `executor.slurm` or the CLI) with one task per GPU (`tasks_per_node`) on every node; the tasks join
  one DDP process group from submitit's job environment, rank 0 writes and evaluates, and a preempted
  or timed-out job is requeued and resumes from its checkpoint. `executor.slurm.cluster: local` runs
  the same path on this machine with submitit's local executor (what the tests use).
All of them call `run_job.execute_run`, which skips DONE runs and resumes interrupted ones.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mage_bench.errors import UserError
from mage_bench.registry import Registry
from mage_bench.run_job import RunTask, execute_run
from mage_bench.runs import DONE_FILE, SHARED_DIR


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


def _one_after_another(ctx: SweepContext, plans: list[Any],
                       train_command: list[str] | None = None) -> list[dict[str, Any]]:
    outcomes = []
    with _bar(ctx, len(plans)) as bar:
        for plan in plans:
            bar.set_postfix_str(plan.name)
            outcomes.append(execute_run(plan, ctx.spec, ctx.runs_dir, ctx.device, progress=False,
                                        train_command=train_command))
            bar.update(1)
    return outcomes


def run_local(ctx: SweepContext, plans: list[Any]) -> list[dict[str, Any]]:
    return _one_after_another(ctx, plans)


def run_torchrun(ctx: SweepContext, plans: list[Any]) -> list[dict[str, Any]]:
    nproc = ctx.spec.executor.nproc_per_node
    if nproc < 1:
        raise UserError(f"executor.nproc_per_node must be >= 1, got {nproc}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "mage_bench.cli"]
    return _one_after_another(ctx, plans, train_command=command)


def run_slurm(ctx: SweepContext, plans: list[Any]) -> list[dict[str, Any]]:
    try:
        import submitit
    except ImportError:
        raise UserError("the slurm executor needs submitit: pip install 'mage-bench[slurm]'") from None
    options = ctx.spec.executor.slurm
    executor = submitit.AutoExecutor(folder=str(ctx.runs_dir / SHARED_DIR / "submitit"), cluster=options.cluster)
    executor.update_parameters(name=f"mage-{ctx.spec.name}", timeout_min=options.timeout_min, mem_gb=options.mem_gb,
                               gpus_per_node=options.gpus_per_node, tasks_per_node=options.tasks,
                               cpus_per_task=options.cpus_per_task, nodes=options.nodes,
                               slurm_partition=options.partition)
    todo = [plan for plan in plans if not (ctx.runs_dir / plan.name / DONE_FILE).is_file()]
    outcomes = {plan.name: {"run": plan.name, "status": "done", "skipped": True} for plan in plans if plan not in todo}
    # The device is chosen on the node that runs the job ("auto" there), not here.
    jobs = [(plan, executor.submit(RunTask(), plan, ctx.spec, ctx.runs_dir, ctx.spec.eval.device)) for plan in todo]
    with _bar(ctx, len(plans)) as bar:
        bar.update(len(outcomes))
        for plan, job in jobs:
            try:
                outcomes[plan.name] = job.results()[0]  # rank 0's: the task that writes and evaluates
            except Exception as exc:  # the job itself died (a task failed, node failure, out of requeues)
                detail = str(exc).splitlines()[0] if str(exc) else repr(exc)
                outcomes[plan.name] = {"run": plan.name, "status": "failed", "error": f"slurm job {job.job_id}: {detail}"}
            bar.update(1)
    return [outcomes[plan.name] for plan in plans]  # in plan order, as the other executors


EXECUTORS.register("local")(Executor(run_local, processes=lambda options: 1))
EXECUTORS.register("torchrun")(Executor(run_torchrun, processes=lambda options: options.nproc_per_node))
EXECUTORS.register("slurm")(Executor(run_slurm, processes=lambda options: options.slurm.nodes * options.slurm.tasks))
