"""Running a sweep: expand its spec, run every (point, seed), evaluate, write the report.

Layout under the runs folder (default runs/<sweep>; the names are defined in `mage_bench.runs`):
  _shared/tokenizer/      trained once per sweep (or the spec's `tokenizer.path`)
  _shared/cache/          reference images and statistics for FID, shared by every run
  _reference/untrained/   the untrained model, evaluated like the runs ("nothing learned")
  _reference/*.json       raw-pixel and real-held-out-image result records
  <point>-<hash>-s<seed>/ one run folder each (run directory contract) + sweep-run.json
  sweep.json              the expanded sweep: points, runs, densities, timings (what the report reads)
The spec itself (schema, presets, validation, run names) is `mage_bench.sweep_spec`; one run from
training to DONE is `mage_bench.run_job`; the executors that carry runs out are `mage_bench.executors`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mage_bench.config import to_dict
from mage_bench.confounds import check_confounds, format_table
from mage_bench.errors import UserError
from mage_bench.executors import EXECUTORS, SweepContext, planned_layout
from mage_bench.run_job import (
    GENERATION_FLAGS,
    check_evaluation_inputs,
    evaluate_run_folder,
    read_timing,
    release_accelerator_memory,
    trained_already,
)
from mage_bench.runs import (
    CHECKPOINT_FILE,
    DONE_FILE,
    FAILED_FILE,
    RAW_PIXELS_RUN,
    REAL_HELDOUT_RUN,
    REFERENCE_DIR,
    RUN_META,
    SHARED_DIR,
    SWEEP_FILE,
    UNTRAINED_RUN,
    read_launch,
)
from mage_bench.sweep_spec import RunPlan, SweepSpec, check_parameter, expand, load_spec

__all__ = ["RunPlan", "SweepSpec", "check_parameter", "expand", "load_spec", "run_sweep"]


# --------------------------------------------------------------------------------------------
# Running


def prepare_tokenizer(ctx: SweepContext) -> str:
    """The sweep's tokenizer folder: the spec's path, or trained once into _shared/tokenizer (resumable)."""
    from mage_bench.config import TokenizerJobConfig, resolve_config
    from mage_bench.tokenizer import CARD_FILE
    from mage_bench.tokenizer.train import train_tokenizer

    if ctx.spec.tokenizer.path:
        if not Path(ctx.spec.tokenizer.path).is_dir():
            raise UserError(f"tokenizer.path {ctx.spec.tokenizer.path} is not a folder; train one with "
                            "mage-bench tokenizer train or drop tokenizer.path")
        return ctx.spec.tokenizer.path
    out = ctx.runs_dir / SHARED_DIR / "tokenizer"
    if not (out / CARD_FILE).is_file():  # the card is written last: no card, not finished
        tic = time.perf_counter()
        config = resolve_config(TokenizerJobConfig, ctx.spec.tokenizer.train)
        train_tokenizer(config, out, resume=True, progress=ctx.progress)
        ctx.timings["tokenizer_s"] = time.perf_counter() - tic
    return str(out)


# --------------------------------------------------------------------------------------------
# Reference rows: what "nothing learned" and "good" look like, through the same evaluators

RAW_PIXELS_MAX_SIDE = 32  # raw-pixel features of large images are downsampled to at most 32x32


def raw_pixel_features(data: Any, split: str) -> tuple[Any, Any]:
    """(images flattened [N, 3*s*s] float32, labels) in the evaluation view, s <= RAW_PIXELS_MAX_SIDE."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from mage_bench.data import create_dataset

    loader = torch.utils.data.DataLoader(create_dataset(data, split, train_transform=False), batch_size=256)
    feats, labels = [], []
    for images, targets in loader:
        if images.shape[-1] > RAW_PIXELS_MAX_SIDE:
            images = F.interpolate(images, size=RAW_PIXELS_MAX_SIDE, mode="bilinear", antialias=True,
                                   align_corners=False)
        feats.append(images.flatten(1).numpy().astype(np.float32))
        labels.append(np.asarray(targets))
    return np.concatenate(feats), np.concatenate(labels)


def compute_references(ctx: SweepContext, plans: list[RunPlan]) -> None:
    """Raw pixels and real held-out images (records in _reference/*.json) and the untrained model
    (a run folder in _reference/untrained, evaluated like the runs). Each is computed once."""
    import dataclasses

    from mage_bench.io import atomic_write_json, atomic_write_text
    from mage_bench.train import save_initial_checkpoint

    spec, first = ctx.spec, plans[0].config
    folder = ctx.runs_dir / REFERENCE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    settings = dataclasses.replace(spec.eval, device=ctx.device)
    raw_file = folder / "raw-pixels.json"
    if not raw_file.is_file():
        write_raw_pixel_records(raw_file, first, settings, spec.name)
    real_file = folder / "real-heldout.json"
    if not real_file.is_file() and spec.eval.profile is not None:
        # The floor under the profile: its metrics of the held-out split's images against its reference.
        from mage_bench.eval.image_sets import dataset_reference
        from mage_bench.eval.profile_eval import evaluate_profile
        from mage_bench.eval.runner import profile_for_runs

        profile = profile_for_runs(spec.eval.profile)
        other = "test" if profile.real_split == "train" else "train"
        heldout = dataset_reference(first.data, other, ctx.cache, ctx.progress)
        records = []  # a profile pinning another sample count has no held-out floor: its count would differ
        if profile.num_samples in (None, heldout.count):
            records = evaluate_profile(heldout.folder, first.data.name, profile, weights=settings.weights,
                                       device=settings.device, cache_dir=ctx.cache, progress=ctx.progress,
                                       sweep=spec.name)
        atomic_write_json(real_file, [{**r, "run": REAL_HELDOUT_RUN.format(split=other)} for r in records])
    if not real_file.is_file():
        # The floor of the generation metrics: real images the model never saw, against the reference.
        from mage_bench.eval.generation import evaluate_generation
        from mage_bench.eval.image_sets import dataset_reference

        other = "test" if spec.eval.real_split == "train" else "train"
        heldout = dataset_reference(first.data, other, ctx.cache, ctx.progress).folder
        records = evaluate_generation(heldout, first.data.name, dataclasses.replace(settings, num_samples=None),
                                      GENERATION_FLAGS, cache_dir=ctx.cache, progress=ctx.progress,
                                      sweep=spec.name)
        atomic_write_json(real_file, [{**r, "run": REAL_HELDOUT_RUN.format(split=other)} for r in records])
    untrained = folder / UNTRAINED_RUN
    if not (untrained / DONE_FILE).is_file():
        save_initial_checkpoint(first, untrained)
        evaluate_run_folder(untrained, spec.eval, spec.name, ctx.cache, ctx.device, ctx.progress)
        atomic_write_text(untrained / DONE_FILE, "{}\n")
    ctx.timings["references_s"] = time.perf_counter() - tic


def write_raw_pixel_records(path: Path, config: Any, settings: Any, sweep: str) -> None:
    """`eval all`'s representation evaluators on raw pixels instead of a model's features."""
    from mage_bench.eval.runner import EVAL_ALL, EVALUATORS
    from mage_bench.results import RecordContext, build_records, config_hash, write_records

    train_x, train_y = raw_pixel_features(config.data, "train")
    test_x, test_y = raw_pixel_features(config.data, "test")
    records = []
    for name in EVAL_ALL:
        evaluator = EVALUATORS.get(name)
        context = RecordContext(evaluator=name, run=RAW_PIXELS_RUN, dataset=config.data.name, split="test",
                                feature_extractor="raw-pixels", n_samples=len(test_y), seed=0,
                                config_hash=config_hash(config.data), sweep=sweep)
        rows = evaluator.compute(train_x, train_y, test_x, test_y, 0, settings, settings.device)
        records += build_records(context, evaluator.metrics, rows)
    write_records(path, records)


def densities(spec: SweepSpec, plans: list[RunPlan]) -> dict[str, dict[str, Any]]:
    """Each point's masking-ratio density on a grid (point masses as their location)."""
    import numpy as np

    grid = np.linspace(0.0, 1.0, 401)
    out = {}
    for plan in plans:
        if plan.point in out:
            continue
        dist = plan.config.masking.distribution
        pdf = np.asarray(dist.pdf(grid), dtype=float)
        low, high = dist.support()
        out[plan.point] = {"spec": dist.spec(), "mean": float(dist.mean()), "x": grid.round(4).tolist(),
                           "pdf": [None if not np.isfinite(v) else round(float(v), 6) for v in pdf],
                           "point_mass": float(low) if low == high else None}
    return out


# --------------------------------------------------------------------------------------------
# The sweep as a whole


def run_status(runs_dir: Path, plan: RunPlan) -> str:
    """done | failed | trained (evaluation left) | partial | todo, from what is on disk."""
    folder = runs_dir / plan.name
    if (folder / DONE_FILE).is_file():
        return "done"
    if (folder / FAILED_FILE).is_file():
        return "failed (will retry)"
    if trained_already(folder):
        return "trained (evaluates)"
    if (folder / CHECKPOINT_FILE).is_file():
        return "partial (resumes)"
    return "todo"


def check_existing_runs(runs_dir: Path, plans: list[RunPlan], spec: SweepSpec) -> None:
    """A run folder made from another config (an edited spec) is never skipped or resumed silently."""
    from mage_bench.results import path_config_hash

    for plan in plans:
        meta_path = runs_dir / plan.name / RUN_META
        if meta_path.is_file():
            stored = json.loads(meta_path.read_text()).get("config_hash")
            # Folders made before the tokenizer was hashed by content hold the path-based hash.
            if stored and stored not in (plan.meta(spec)["config_hash"], path_config_hash(plan.config)):
                raise UserError(f"{runs_dir / plan.name} was made from another config (the spec changed); "
                                f"use another --runs folder or delete that run")
        check_resumable_launch(runs_dir / plan.name, spec)


def check_resumable_launch(run_dir: Path, spec: SweepSpec) -> None:
    """A partly trained run resumes only with the processes it started with (global batch and lr); a
    trained one has only its one-process evaluation left, on any executor."""
    launch = read_launch(run_dir)
    if (run_dir / DONE_FILE).is_file() or not (run_dir / CHECKPOINT_FILE).is_file() or launch is None:
        return
    if trained_already(run_dir):
        return
    recorded = launch.get("world_size")
    planned = EXECUTORS.get(spec.executor.name).processes(spec.executor)
    if recorded != planned:
        raise UserError(f"{run_dir} is partly trained with {recorded} processes, but the {spec.executor.name} "
                        f"executor would resume it with {planned}: the global batch and lr would change mid-run; "
                        f"resume it with {recorded} processes (executor settings), or delete it to start over")


def dry_run_table(ctx: SweepContext, plans: list[RunPlan], weights: list[str] | None = None) -> str:
    rows = [("run", "point", "seed", "status")]
    rows += [(p.name, p.point, str(p.seed), run_status(ctx.runs_dir, p)) for p in plans]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    pending = sum(run_status(ctx.runs_dir, p) != "done" for p in plans)
    tokenizer = ctx.spec.tokenizer.path or str(ctx.runs_dir / SHARED_DIR / "tokenizer")
    from mage_bench.tokenizer import CARD_FILE

    if (Path(tokenizer) / CARD_FILE).is_file():
        tok_state = "exists"
    else:
        tok_state = "missing: import or train it first" if ctx.spec.tokenizer.path else "would be trained"
    lines += ["", format_table(ctx.differs), "", launch_line(ctx.spec, plans[0].config)]
    how = ""
    if ctx.spec.executor.name == "local":
        how = layout_words(*planned_layout(ctx, plans))
    lines += ["", f"would execute: {pending} of {len(plans)} runs with the {ctx.spec.executor.name} executor{how}; "
              f"tokenizer {tokenizer} ({tok_state}); report to {ctx.report_dir}"]
    if weights:
        lines.append(f"FID extractor weights: {'; '.join(weights)}")
    return "\n".join(lines)


def layout_words(workers: int, threads: int | None) -> str:
    """' (2 runs side by side, 1 torch thread each)': how the local executor carries the runs out."""
    side = f"{workers} runs side by side" if workers > 1 else "one run at a time"
    each = f", {threads} torch thread{'s' if threads > 1 else ''} each" if threads is not None else ""
    return f" ({side}{each})"


def launch_line(spec: SweepSpec, config: Any) -> str:
    """How each run trains: processes x batch per process = global batch, and the lr scaled from it."""
    from mage_bench.train import launch_record

    processes = EXECUTORS.get(spec.executor.name).processes(spec.executor)
    launch = launch_record(config, processes)
    slurm = spec.executor.slurm
    how = f" ({slurm.nodes} nodes x {slurm.tasks} tasks)" if spec.executor.name == "slurm" else ""
    return (f"each run trains on {processes} process{'es' if processes > 1 else ''}{how} x batch "
            f"{launch['batch_per_process']} = global batch {launch['global_batch']}; lr = blr {config.train.blr:g} "
            f"x {launch['global_batch']} / 256 = {launch['lr']:.4g}")


def write_sweep_file(ctx: SweepContext, plans: list[RunPlan], outcomes: list[dict[str, Any]]) -> None:
    from mage_bench.io import atomic_write_json, git_commit, package_versions, utc_now

    runs = []
    for plan, outcome in zip(plans, outcomes, strict=True):
        if outcome["run"] != plan.name:
            raise RuntimeError(f"executor returned {outcome['run']} where {plan.name} was expected")
        runs.append({**plan.meta(ctx.spec), "status": outcome["status"], "error": outcome.get("error"),
                     "skipped": outcome.get("skipped", False), "timing": read_timing(ctx.runs_dir / plan.name),
                     "launch": read_launch(ctx.runs_dir / plan.name),
                     **({"slurm_jobs": outcome["slurm_jobs"]} if outcome.get("slurm_jobs") else {})})
    previous = ctx.runs_dir / SWEEP_FILE
    timings = dict(ctx.timings)
    if previous.is_file():  # a resumed sweep keeps the first measurement of its shared work
        old = json.loads(previous.read_text()).get("timings", {})
        for key in ("tokenizer_s", "references_s"):
            if key in old and key not in timings:
                timings[key] = old[key]
    import platform

    atomic_write_json(previous, {
        "sweep": ctx.spec.name, "description": ctx.spec.description, "parameter": ctx.spec.parameter_label,
        "axes": [{"parameter": a.parameter, "points": [{"label": p.label, "value": p.value} for p in a.points]}
                 for a in ctx.spec.axes],
        "points": _points(plans), "differs": ctx.differs,
        "seeds": list(ctx.spec.seeds), "spec": to_dict(ctx.spec), "runs": runs,
        "densities": densities(ctx.spec, plans), "timings": timings,
        # local: the worker processes and torch threads per run of this invocation (the stage timings
        # are summed over runs, so with workers > 1 they add up to more than the wall time)
        "executor": {"name": ctx.spec.executor.name, **ctx.layout},
        "provenance": {"git_commit": git_commit(), "versions": package_versions(), "device": ctx.device,
                       "host": platform.node(), "date": utc_now()}})


def _points(plans: list[RunPlan]) -> list[dict[str, Any]]:
    """Each point once, in grid order (the first axis varying slowest), with its label on every axis."""
    out: dict[str, dict[str, Any]] = {}
    for plan in plans:
        out.setdefault(plan.point, {"label": plan.point, "value": plan.value, "axes": plan.axes})
    return list(out.values())


def run_sweep(name_or_path: str, preset: str | None = None, executor: str | None = None,
              runs_dir: str | Path | None = None, report_dir: str | Path | None = None, dry_run: bool = False,
              progress: bool = False, slurm: dict[str, Any] | None = None,
              local: dict[str, Any] | None = None) -> dict[str, Any]:
    """Expand, run (skipping DONE runs, resuming interrupted ones), evaluate, report. Returns a summary.

    `slurm`, `local`: executor settings from the CLI (None values: the spec's)."""
    import dataclasses

    from mage_bench.runs import resolve_device

    spec = load_spec(name_or_path, preset)
    check_parameter(spec)
    if executor:
        spec = dataclasses.replace(spec, executor=dataclasses.replace(spec.executor, name=executor))
    slurm = {k: v for k, v in (slurm or {}).items() if v is not None}
    if slurm:  # CLI > spec for the Slurm resources
        spec = dataclasses.replace(spec, executor=dataclasses.replace(
            spec.executor, slurm=dataclasses.replace(spec.executor.slurm, **slurm)))
    local = {k: v for k, v in (local or {}).items() if v is not None}
    if local and spec.executor.name != "local":
        raise UserError(f"--{' and --'.join(local)} lay out the local executor's runs; the {spec.executor.name} "
                        f"executor ignores them: drop them, or add --executor local")
    if local:  # CLI > spec for the local executor's workers and threads, checked as the spec's are
        from mage_bench.config import from_dict

        spec = dataclasses.replace(spec, executor=from_dict(
            type(spec.executor), {**to_dict(spec.executor), **local}, "executor"))
    run_executor = EXECUTORS.get(spec.executor.name)
    runs = Path(runs_dir) if runs_dir else Path("runs") / spec.name
    report = Path(report_dir) if report_dir else Path("reports") / spec.name
    ctx = SweepContext(spec, runs, report, progress, spec.eval.device)
    tokenizer = spec.tokenizer.path or str(runs / SHARED_DIR / "tokenizer")
    plans = expand(spec, tokenizer)
    ctx.differs = check_confounds(spec, plans)  # refuses an undeclared difference before anything runs
    check_existing_runs(runs, plans, spec)
    # The extractor weights and backend of every evaluation, checked where the sweep is launched (the
    # Slurm jobs too): an offline node must not find a missing file after training.
    weights = check_evaluation_inputs(spec.eval, [plan.config.data.name for plan in plans], dry_run)
    if spec.eval.inpaint:  # a mask file of another size must not surface after training
        from mage_bench.mage.inpaint_masks import check_masks_fit

        for size in sorted({plan.config.data.image_size for plan in plans}):
            check_masks_fit(spec.eval.inpaint, size)
    from mage_bench.eval.fid_backends import ISC_SPLITS

    if spec.eval.num_samples is not None and spec.eval.num_samples < ISC_SPLITS:  # sweeps always compute IS
        raise UserError(f"eval.num_samples {spec.eval.num_samples}: IS needs at least {ISC_SPLITS} generated "
                        f"images (it averages over {ISC_SPLITS} splits); raise it")
    for depth in sorted({plan.config.model.depth for plan in plans}):  # nor a block beyond a point's encoder
        spec.eval.feature_views(depth)
    if spec.eval.finetune is not None:  # an unknown preset must not surface after training
        from mage_bench.eval.finetune import FINETUNE_PRESETS

        FINETUNE_PRESETS.get(spec.eval.finetune)  # UserError naming the presets
    if dry_run:
        return {"dry_run": True, "table": dry_run_table(ctx, plans, weights), "runs": [p.meta(spec) for p in plans],
                "differs": ctx.differs}
    # Slurm jobs choose their device on their node; everything else runs here and needs it here.
    ctx.device = resolve_device(spec.eval.device) if spec.executor.name != "slurm" else "cpu"

    start = time.perf_counter()
    runs.mkdir(parents=True, exist_ok=True)
    prepare_tokenizer(ctx)
    if spec.eval.references:
        compute_references(ctx, plans)
    # What the tokenizer and the references cached on the GPU is not kept while runs train there in
    # other processes (torchrun).
    release_accelerator_memory()
    outcomes = run_executor.run(ctx, plans)
    # The breakdown of this invocation: shared work, then the per-run stages summed over runs done now.
    for stage in ("train_s", "generation_s", "evaluation_s"):
        ctx.timings[stage] = sum(o.get(stage, 0.0) for o in outcomes)
    write_sweep_file(ctx, plans, outcomes)
    from mage_bench.report import build_report

    tic = time.perf_counter()
    index = build_report([runs], report)
    ctx.timings["report_s"] = time.perf_counter() - tic
    write_sweep_file(ctx, plans, outcomes)  # again, with the report's time
    failed = [o for o in outcomes if o["status"] == "failed"]
    order = ("tokenizer_s", "references_s", "train_s", "generation_s", "evaluation_s", "report_s")
    ctx.timings = {k: round(ctx.timings[k], 1) for k in order if k in ctx.timings}
    return {"sweep": spec.name, "runs": len(plans), "failed": len(failed), "executor": ctx.layout,
            "errors": {o["run"]: o["error"] for o in failed}, "report": str(index),
            "total_s": round(time.perf_counter() - start, 1), "timings": ctx.timings}
