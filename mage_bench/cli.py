"""The `mage-bench` command: thin subcommands that parse, build a config and call one library function.

Heavy imports (torch, torchvision, scikit-learn) happen inside the command functions, so
`mage-bench --help` answers instantly. Exit codes: 0 success, 2 bad input (one line on stderr),
1 internal failure. With `--json`, stdout carries exactly one JSON document.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mage_bench import __version__
from mage_bench.errors import UserError
from mage_bench.runs import resolve_device

EXAMPLES = """\
examples:
  mage-bench tokenizer train --data digits --out models/vq-digits
  mage-bench import vqgan_jax_strongaug.ckpt --kind vqgan --out models/vqgan-official
  mage-bench sweep masking --preset tiny
"""

def _progress_enabled(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def _emit(args: argparse.Namespace, document: Any, human: str) -> None:
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    else:
        print(human)


# --------------------------------------------------------------------------------------------
# Commands


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from mage_bench.config import TokenizerJobConfig, cli_layer, load_yaml, resolve_config

    file_layer = load_yaml(args.config) if args.config else {}
    # --image-size sets both the data and the tokenizer's design size, which must agree.
    layer = cli_layer(**{"data.name": args.data, "data.image_size": args.image_size,
                         "tokenizer.resolution": args.image_size, "seed": args.seed,
                         "train.steps": args.steps, "train.batch_size": args.batch_size,
                         "tokenizer.name": args.tokenizer})
    config = resolve_config(TokenizerJobConfig, file_layer, layer)
    from mage_bench.tokenizer.train import train_tokenizer

    card = train_tokenizer(config, args.out, resume=args.resume, progress=_progress_enabled(args), device=args.device)
    m = card["metrics"]["test"]
    _emit(args, card,
          f"tokenizer written to {args.out} ({card['steps']} steps, {card['train_time_s']:.0f} s): "
          f"test PSNR {m['psnr_db']:.2f} dB, codebook usage {m['codes_used']}/{card['codebook_size']} "
          f"({100 * m['codebook_usage']:.0f}%), perplexity {m['perplexity']:.1f}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    if args.kind == "mage":
        from mage_bench.import_mage import import_official_mage

        card = import_official_mage(args.path, args.out)
        _emit(args, card, f"imported {args.path} ({card['architecture']}) into {args.out}")
        return 0
    from mage_bench.tokenizer.checkpoint import import_official_vqgan

    card = import_official_vqgan(args.path, args.out)
    _emit(args, card, f"imported {args.path} ({card['source']['layout']} layout) into {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from mage_bench.config import RunConfig, cli_layer, load_yaml, resolve_config

    file_layer = load_yaml(args.config) if args.config else {}
    layer = cli_layer(**{"model.name": args.model, "data.name": args.data, "masking.spec": args.masking,
                         "contrastive.weight": args.contrastive_weight, "train.steps": args.steps,
                         "train.batch_size": args.batch_size, "seed": args.seed, "tokenizer": args.tokenizer})
    config = resolve_config(RunConfig, file_layer, layer)
    from mage_bench.train import TrainingFailed, train

    try:
        summary = train(config, args.out, resume=args.resume, progress=_progress_enabled(args))
    except TrainingFailed as exc:
        print(f"mage-bench: training failed: {exc}", file=sys.stderr)
        return 1
    _emit(args, summary, f"trained {summary['step']} steps into {args.out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from mage_bench.samples import generate_images

    manifest = generate_images(args.run, args.num, args.out, steps=args.steps, temperature=args.temperature,
                               seed=args.seed, batch_size=args.batch_size, progress=_progress_enabled(args),
                               device=args.device)
    _emit(args, manifest, f"{args.num} images in {args.out} (grid: {args.out}/grid.png)")
    return 0


def _generation_flags(args: argparse.Namespace) -> tuple[str, ...]:
    return ("fid",) + tuple(flag for flag in ("isc", "kid", "prc") if getattr(args, flag))


# EvalConfig fields that are flags of `mage-bench eval` (the same name with dashes)
EVAL_SETTING_FLAGS = ("profile", "decode_grid", "stream_samples", "num_samples", "real_split", "extractor", "weights", "backend", "device", "layers", "pooling",
                      "knn_ks",
                      "knn_temperature", "fewshot_shots", "fewshot_draws", "probe_epochs", "probe_batch_size",
                      "probe_blr", "batch_size", "inpaint", "inpaint_images", "inpaint_steps", "inpaint_temperature",
                      "inpaint_argmax", "inpaint_paste_back", "inpaint_dilate", "inpaint_fd", "finetune",
                      "finetune_steps")


def _eval_settings(args: argparse.Namespace) -> Any:
    """The `EvalConfig` of an `eval` command: its defaults, overridden by the flags given."""
    from mage_bench.config import EvalConfig, from_dict

    given = {name: getattr(args, name) for name in EVAL_SETTING_FLAGS if getattr(args, name) is not None}
    return from_dict(EvalConfig, given, "eval")


def _record_line(r: dict[str, Any]) -> str:
    """One printed line per record, named as the evaluator declares the metric."""
    from mage_bench.eval.generation import EVALUATOR as GENERATION
    from mage_bench.eval.runner import metric_of

    label = metric_of(r["evaluator"], r["metric"]).display({r["feature_extractor"]},
                                                            standard=r.get("standard_extractor", True))
    details = "".join(f" {k}={r[k]}" for k in ("k", "shots", "mask") if k in r)
    if "layer" in r and (r["layer"], r["pooling"]) != (r["depth"] - 1, "mean"):  # not the official feature
        details += f" layer={r['layer']} pooling={r['pooling']}"
    spread = f" +- {r['std']:.4f}" if r.get("std") is not None and r["evaluator"] == GENERATION else ""
    if r.get("ci_low") is not None:
        spread += f" [95% CI {r['ci_low']:.4f}, {r['ci_high']:.4f}]"
    return f"{r['evaluator']}: {label}{details}: {r['value']:.4f}{spread}"


# Flags a profile pins (so they would be ignored or contradict it under --profile)
PROFILE_PINNED_FLAGS = (("--num-samples", "num_samples"), ("--real-split", "real_split"), ("--extractor", "extractor"),
                        ("--backend", "backend"), ("--isc", "isc"), ("--kid", "kid"), ("--prc", "prc"),
                        ("--compare-backends", "compare_backends"))


def _check_profile_flags(args: argparse.Namespace) -> None:
    for flag, given in (("--decode", args.decode_grid), ("--stream-samples", args.stream_samples)):
        if given and args.evaluator not in ("fid", "all"):
            raise UserError(f"{flag} applies to `eval fid` and `eval all`, not `eval {args.evaluator}`")
        if given and not args.profile:
            raise UserError(f"{flag} needs --profile NAME (`mage-bench eval profiles`)")
    if not args.profile:
        return
    if args.evaluator not in ("fid", "all"):
        raise UserError(f"--profile applies to `eval fid` and `eval all`, not `eval {args.evaluator}`")
    pinned = [flag for flag, name in PROFILE_PINNED_FLAGS if getattr(args, name)]
    if pinned:
        raise UserError(f"{pinned[0]} is pinned by --profile {args.profile} (its extractor, backend, sample counts "
                        "and metrics); drop it, or write a profile of your own (`mage-bench eval profiles`)")


def _decode_grid_fid(args: argparse.Namespace) -> int:
    from mage_bench.eval.decode_grid import evaluate_decode_grid, parse_decode, records_name
    from mage_bench.eval.profiles import load_profile
    from mage_bench.runs import CHECKPOINT_FILE, EVAL_DIR

    if not args.profile:
        raise UserError("--decode evaluates every decoding setting under an evaluation profile: add --profile NAME "
                        "(`mage-bench eval profiles`)")
    grid = parse_decode(args.decode_grid)
    profile = load_profile(args.profile)
    if not args.fake or not (Path(args.fake) / CHECKPOINT_FILE).is_file():
        raise UserError("--decode needs --fake RUN_DIR (a run folder: its images are decoded at every setting)")
    records = evaluate_decode_grid(args.fake, args.real, profile, grid, weights=args.weights,
                                   device=args.device or "auto", cache_dir=args.cache, progress=_progress_enabled(args),
                                   stream=bool(args.stream_samples))
    lines = [f"steps {r['decode_steps']}, temperature {r['decode_temperature']:g}: {_record_line(r)}" for r in records]
    _emit(args, records, "\n".join(lines) + f"\nrecords: {Path(args.fake) / EVAL_DIR / records_name(profile)}.json")
    return 0


def _profile_fid(args: argparse.Namespace) -> int:
    from mage_bench.eval.profile_eval import evaluate_profile

    if args.decode_grid:
        return _decode_grid_fid(args)
    if not args.fake:
        raise UserError(f"`mage-bench eval fid --profile {args.profile}` needs --fake DIR|RUN_DIR")
    records = evaluate_profile(args.fake, args.real, args.profile, weights=args.weights, device=args.device or "auto",
                               cache_dir=args.cache, progress=_progress_enabled(args),
                               stream=bool(args.stream_samples))
    first = records[0]
    lines = [_record_line(r) for r in records]
    lines.append(f"(profile {first['profile']} {first['profile_hash']}: {first['n_samples']} generated vs "
                 f"{first['n_real'] if first['n_real'] is not None else 'statistics of the'} real images, "
                 f"extractor {first['feature_extractor']}"
                 + (f", 95% bootstrap intervals over {first['bootstrap']} resamples" if first.get("bootstrap") else "")
                 + ")")
    _emit(args, records, "\n".join(lines))
    return 0


def cmd_eval_profiles(args: argparse.Namespace) -> int:
    from mage_bench.eval.profiles import all_profiles

    found = all_profiles()
    lines = []
    for profile, source in found:
        pins = profile.describe()
        what = (f"{pins['extractor']}, {', '.join(pins['metrics'])}; {pins['num_samples'] or 'all'} samples vs "
                f"{pins['reference']}" + (f" {pins['reference_data']}" if pins["reference_data"] else "")
                + (f" ({pins['reference_preparation']})" if pins["reference_preparation"] else ""))
        lines.append(f"{profile.name} v{profile.version} [{profile.hash}] ({source}): {profile.description}\n    {what}")
    _emit(args, [{**profile.describe(), "source": source} for profile, source in found], "\n".join(lines))
    return 0


def cmd_eval_stats(args: argparse.Namespace) -> int:
    from mage_bench.eval.reference_stats import write_statistics

    if not args.real or not args.out:
        raise UserError("`mage-bench eval stats` needs --real DIR|DATASET and --out FILE.npz")
    summary = write_statistics(args.real, args.out, extractor=args.extractor, weights=args.weights,
                               device=args.device or "auto", image_size=args.image_size, split=args.real_split,
                               cache_dir=args.cache, progress=_progress_enabled(args))
    _emit(args, summary, f"{args.out}: mu, sigma and the {summary['count']} images' {summary['feature_dim']}-d "
                         f"{summary['extractor']} activations (sha256 {summary['sha256'][:16]})")
    return 0


def cmd_eval_fid(args: argparse.Namespace) -> int:
    from mage_bench.eval.generation import evaluate_generation

    if args.profile or args.decode_grid:
        return _profile_fid(args) if args.profile else _decode_grid_fid(args)
    if not args.real or not args.fake:
        raise UserError("`mage-bench eval fid` needs --real DIR|DATASET and --fake DIR|RUN_DIR")
    if args.compare_backends:
        return _compare_backends(args)
    records = evaluate_generation(args.fake, args.real, _eval_settings(args), _generation_flags(args),
                                  cache_dir=args.cache, progress=_progress_enabled(args))
    human = "\n".join(_record_line(r) for r in records)
    human += f"\n({records[0]['n_samples']} generated vs {records[0]['n_real']} real images, " \
             f"{records[0]['backend']}, extractor {records[0]['feature_extractor']})"
    _emit(args, records, human)
    return 0


def _compare_backends(args: argparse.Namespace) -> int:
    from mage_bench.eval.generation import compare_backends

    if args.backend:
        raise UserError("--compare-backends runs every backend; drop --backend")
    flags = _generation_flags(args)
    if set(flags) - {"fid", "kid"}:
        raise UserError("--compare-backends compares fid and kid (clean-fid computes no IS or precision/recall); "
                        "drop --isc/--prc")
    result = compare_backends(args.fake, args.real, _eval_settings(args), flags, cache_dir=args.cache,
                              progress=_progress_enabled(args))
    lines = [f"{name}: " + ", ".join(f"{k} {v:.6g}" for k, v in values.items())
             for name, values in result["backends"].items()]
    lines += [f"{key} {pair}: {diff:+.6g}"
              for key, pairs in result["differences"].items() for pair, diff in pairs.items()]
    lines.append(f"({result['n_samples']} generated ({result['fake_size']}) vs {result['n_real']} real images "
                 f"({result['real_size']}), extractor {result['extractor']}; the backends resize to the extractor's "
                 "input differently, so they agree only on images already at its size)")
    _emit(args, result, "\n".join(lines))
    return 0


def cmd_eval_all(args: argparse.Namespace) -> int:
    from mage_bench.eval.runner import evaluate_all

    if not args.run:
        raise UserError("`mage-bench eval all` needs --run RUN_DIR")
    written = evaluate_all(args.run, _eval_settings(args), data_name=args.data,
                           flags=() if args.profile else _generation_flags(args) + ("isc", "kid"), cache_dir=args.cache,
                           progress=_progress_enabled(args), resume=args.resume)
    lines = [_record_line(r) for records in written.values() for r in records]
    _emit(args, written, "\n".join(lines) + f"\nrecords: {args.run}/eval/{{{','.join(written)}}}.json")
    return 0


# --protocol -> evaluator of the paper's linear probe (mae: fresh views every epoch; mae-cached: cached features)
MAE_PROTOCOLS = {"mae": "linear-mae", "mae-cached": "linear-mae-cached"}


def _check_protocol_flags(args: argparse.Namespace) -> None:
    """--protocol and the --probe-* flags only where they apply, rather than silently ignored."""
    if args.protocol != "logreg" and args.evaluator != "linear":
        raise UserError(f"--protocol {args.protocol} applies to `eval linear` only")
    probe_flags = [flag for flag, value in (("--probe-epochs", args.probe_epochs),
                                            ("--probe-batch-size", args.probe_batch_size),
                                            ("--probe-blr", args.probe_blr)) if value is not None]
    if probe_flags and args.protocol not in MAE_PROTOCOLS:
        raise UserError(f"{probe_flags[0]} needs `eval linear --protocol mae` or `--protocol mae-cached`")


def cmd_eval_finetune(args: argparse.Namespace) -> int:
    from mage_bench.eval.finetune import EVALUATOR, finetune_run

    if not args.run:
        raise UserError("`mage-bench eval finetune` needs --run RUN_DIR")
    if args.preset and args.finetune and args.preset != args.finetune:
        raise UserError(f"--preset {args.preset} and --finetune {args.finetune} disagree; give one of them")
    records = finetune_run(args.run, preset=args.preset or args.finetune, resume=args.resume,
                           progress=_progress_enabled(args), device=args.device or "auto", steps=args.finetune_steps)
    lines = [_record_line(r) for r in records]
    _emit(args, records, "\n".join(lines) + f"\n(preset {records[0]['preset']}, {records[0]['n_samples']} test "
                                            f"images; checkpoint and log under {args.run}/finetune/)\nrecords: "
                                            f"{args.run}/eval/{EVALUATOR}.json")
    return 0


def cmd_eval_inpaint(args: argparse.Namespace) -> int:
    from mage_bench.eval.inpaint import EVALUATOR, evaluate_inpainting

    if not args.run:
        raise UserError("`mage-bench eval inpaint` needs --run RUN_DIR and --masks SPEC,...")
    records = evaluate_inpainting(args.run, _eval_settings(args), data_name=args.data, cache_dir=args.cache,
                                  progress=_progress_enabled(args))
    lines = [f"{_record_line(r)} ({100 * r['mask_ratio']:.0f}% of tokens unknown)" for r in records]
    _emit(args, records, "\n".join(lines) + f"\n({records[0]['n_samples']} test images per mask; completed images "
                                            f"and triplet grids under {args.run}/inpaint/)\nrecords: "
                                            f"{args.run}/eval/{EVALUATOR}.json")
    return 0


def _check_inpaint_flags(args: argparse.Namespace) -> None:
    """The masked-reconstruction flags only with `eval inpaint` (or `eval all`, which runs it when masks are
    given), rather than silently ignored."""
    given = [name for name in EVAL_SETTING_FLAGS if name.startswith("inpaint") and getattr(args, name) is not None]
    if given and args.evaluator not in ("inpaint", "all"):
        flag = "--masks" if given[0] == "inpaint" else "--" + given[0].replace("_", "-")
        raise UserError(f"{flag} applies to `eval inpaint` (and `eval all`) only")
    if given and args.evaluator == "all" and args.inpaint is None:
        flag = "--" + given[0].replace("_", "-")
        raise UserError(f"{flag} needs --masks with `eval all` (it runs inpainting only when masks are given)")
    if args.evaluator == "inpaint":
        generation_only = [flag for flag, value in (("--real", args.real), ("--fake", args.fake),
                                                    ("--num-samples", args.num_samples), ("--isc", args.isc),
                                                    ("--kid", args.kid), ("--prc", args.prc)) if value]
        if generation_only:
            raise UserError(f"{generation_only[0]} applies to `eval fid` and `eval all`, not `eval inpaint` "
                            "(which completes --inpaint-images test images of the run's data)")


# Flags `eval finetune` reads besides --run, --preset, --resume and the output ones: the rest would do nothing.
FINETUNE_FLAGS = ("device", "finetune", "finetune_steps")
FEATURE_EVALUATORS = ("linear", "fewshot", "knn", "all")  # the evaluators --layers/--pooling choose features for


def _check_finetune_flags(args: argparse.Namespace) -> None:
    """--preset belongs to `eval finetune`, --resume to it and `eval all`, --finetune/--finetune-steps to both;
    `eval finetune` takes no evaluation setting but its own and --device."""
    if args.evaluator != "finetune" and args.preset:
        raise UserError("--preset applies to `eval finetune` only (`eval all` takes --finetune PRESET)")
    if args.evaluator not in ("finetune", "all") and args.resume:
        raise UserError("--resume applies to `eval finetune` and `eval all` only")
    if args.evaluator == "finetune":
        ignored = [name for name in EVAL_SETTING_FLAGS if name not in FINETUNE_FLAGS and getattr(args, name) is not None]
        ignored += [name for name in ("data", "cache") if getattr(args, name)]
        if ignored:
            raise UserError(f"--{ignored[0].replace('_', '-')} does not apply to `eval finetune`, which fine-tunes "
                            "on the run's own data with the preset's settings (override steps with --finetune-steps)")
    if args.evaluator not in ("finetune", "all") and (args.finetune or args.finetune_steps is not None):
        flag = "--finetune" if args.finetune else "--finetune-steps"
        raise UserError(f"{flag} applies to `eval finetune` and `eval all`, not `eval {args.evaluator}`")
    if args.evaluator == "all" and args.finetune_steps is not None and not args.finetune:
        raise UserError("--finetune-steps needs --finetune PRESET with `eval all` (it fine-tunes only when a "
                        "preset is given)")


def _check_feature_flags(args: argparse.Namespace) -> None:
    if args.evaluator not in FEATURE_EVALUATORS and (args.layers or args.pooling):
        flag = "--layers" if args.layers else "--pooling"
        raise UserError(f"{flag} applies to `eval linear|fewshot|knn|all` (the probe features), not "
                        f"`eval {args.evaluator}`")


# What `eval profiles` and `eval stats` read; any other flag given to them would do nothing
OWN_FLAGS = {"profiles": {"json", "quiet"},
             "stats": {"json", "quiet", "real", "out", "extractor", "weights", "device", "image_size", "real_split",
                       "cache"}}
IGNORED = {"evaluator", "func", "command", "protocol"}  # parser plumbing and defaults, never "given"


def _check_own_flags(args: argparse.Namespace) -> None:
    given = [name for name, value in vars(args).items()
             if name not in IGNORED | OWN_FLAGS[args.evaluator] and value not in (None, False, (), [])]
    if given:
        raise UserError(f"--{given[0].replace('_', '-')} does not apply to `eval {args.evaluator}`")


def cmd_eval(args: argparse.Namespace) -> int:
    if args.evaluator in OWN_FLAGS:
        _check_own_flags(args)
        return cmd_eval_profiles(args) if args.evaluator == "profiles" else cmd_eval_stats(args)
    if args.out or args.image_size:
        raise UserError(f"--{'out' if args.out else 'image-size'} applies to `eval stats` only")
    _check_profile_flags(args)
    _check_feature_flags(args)
    _check_protocol_flags(args)
    _check_inpaint_flags(args)
    _check_finetune_flags(args)
    if args.compare_backends and args.evaluator != "fid":
        raise UserError("--compare-backends applies to `eval fid` only")
    if args.evaluator == "fid":
        return cmd_eval_fid(args)
    if args.evaluator == "all":
        return cmd_eval_all(args)
    if args.evaluator == "inpaint":
        return cmd_eval_inpaint(args)
    if args.evaluator == "finetune":
        return cmd_eval_finetune(args)
    if not args.run:
        raise UserError(f"`mage-bench eval {args.evaluator}` needs --run RUN_DIR")
    from mage_bench.eval.runner import evaluate_run

    name = MAE_PROTOCOLS.get(args.protocol, args.evaluator)
    # The run's own data settings (image size, split) apply; --data only swaps the data set.
    written = evaluate_run(args.run, [name], _eval_settings(args), data_name=args.data,
                           progress=_progress_enabled(args))
    records = written[name]
    lines = [_record_line(r) for r in records]
    _emit(args, records, "\n".join(lines) + f"\nrecords: {args.run}/eval/{name}.json")
    return 0


def cmd_inpaint(args: argparse.Namespace) -> int:
    from mage_bench.inpainting import inpaint_images

    manifest = inpaint_images(args.run, args.images, args.mask, args.out, num=args.num, split=args.split,
                              steps=args.steps, temperature=args.temperature, argmax=args.argmax,
                              paste_back=args.paste_back, dilate=args.dilate, seed=args.seed,
                              device=resolve_device(args.device), progress=_progress_enabled(args))
    _emit(args, manifest, f"{manifest['count']} images completed under {manifest['mask']} in {args.out} "
                          f"(NNNNNN-original/-masked/-result.png; grid: {args.out}/grid.png)")
    return 0


def cmd_bench_eval(args: argparse.Namespace) -> int:
    from mage_bench import bench_eval

    if args.what in ("eval", "fid") and not args.run:
        raise UserError(f"`mage-bench bench {args.what}` needs --run RUN_DIR (a trained digits run)")
    device = resolve_device(args.device)
    if args.what == "knn":
        result = bench_eval.bench_knn()
    elif args.what == "eval":
        result = bench_eval.bench_eval_all(args.run, device=device)
    else:
        result = bench_eval.bench_fid_cache(args.run, device=device)
    command = f"mage-bench bench {args.what}" + (f" --run {args.run}" if args.run else "") + f" --device {args.device}"
    result = {**result, "command": command}
    _emit(args, result, "\n".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}"
                                   for k, v in result.items()))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what != "train":
        return cmd_bench_eval(args)
    from mage_bench.bench import bench_train, format_table
    from mage_bench.config import MODEL_PRESETS

    for name in args.models:
        MODEL_PRESETS.get(name)  # a typo is a one-line error before anything is timed
    if args.workers < 1 or (args.threads is not None and args.threads < 1):
        raise UserError("--workers and --threads must be positive integers")
    device = resolve_device(args.device)
    if device != "cpu" and (args.workers > 1 or args.threads is not None):
        raise UserError("--workers and --threads lay out CPU runs; drop them with --device cuda")
    results = bench_train(args.models, args.batch_size, args.steps, device, args.compile, args.workers, args.threads)
    command = (f"mage-bench bench train --models {' '.join(args.models)} --batch-size {args.batch_size} "
               f"--steps {args.steps} --device {args.device}" + (" --compile" if args.compile else "")
               + (f" --workers {args.workers}" if args.workers > 1 else "")
               + (f" --threads {args.threads}" if args.threads is not None else ""))
    _emit(args, {"command": command, "models": [r.as_dict() for r in results]},
          f"{format_table(results)}\n(command: {command})")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from mage_bench.sweep import run_sweep

    slurm = {"partition": args.partition, "gpus_per_node": args.gpus, "timeout_min": args.time_min,
             "mem_gb": args.mem_gb}
    local = {"workers": args.workers, "threads": args.threads}
    summary = run_sweep(args.spec, preset=args.preset, executor=args.executor, runs_dir=args.runs,
                        report_dir=args.out, dry_run=args.dry_run, progress=_progress_enabled(args), slurm=slurm,
                        local=local)
    if args.dry_run:
        _emit(args, summary, summary["table"])
        return 0
    t = summary["timings"]
    breakdown = ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in t.items())
    workers = summary["executor"].get("workers", 1)
    summed = f"; train, generation and evaluation summed over {workers} runs side by side" if workers > 1 else ""
    human = (f"sweep {summary['sweep']}: {summary['runs'] - summary['failed']}/{summary['runs']} runs done in "
             f"{summary['total_s']:.0f} s ({breakdown}{summed})\nreport: {summary['report']}")
    if summary["failed"]:
        human += "\nfailed runs:\n" + "\n".join(f"  {run}: {error}" for run, error in summary["errors"].items())
    _emit(args, summary, human)
    if summary["failed"]:
        print(f"mage-bench: {summary['failed']} of {summary['runs']} runs failed (see the report)", file=sys.stderr)
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mage_bench.report import build_report

    if not args.out:
        raise UserError("`mage-bench report` needs --out REPORT_DIR")
    index = build_report(args.runs, args.out)
    _emit(args, {"report": str(index)}, f"report: {index}")
    return 0


# --------------------------------------------------------------------------------------------
# Parser


def _common(parser: argparse.ArgumentParser, json_flag: bool = True) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    if json_flag:
        parser.add_argument("--json", action="store_true", help="print one JSON document on stdout, nothing else")


def _add_train_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="train MAGE into a run folder",
                       description="Train MAGE. Precedence: CLI flags > --config file > defaults.",
                       epilog="example:\n  mage-bench train --model mage_tiny --data digits --out runs/demo "
                              "--masking truncnorm:mean=0.55,std=0.25,min=0.5,max=1.0",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="preset: mage_tiny, mage_small, mage_vit_base_patch16, mage_vit_large_patch16")
    p.add_argument("--data", help="digits | imagefolder:PATH | cifar10:ROOT")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--masking", help="masking-ratio distribution, e.g. uniform:low=0.5,high=1.0")
    p.add_argument("--contrastive-weight", type=float, help="MAGE-C weight (0 = plain MAGE)")
    p.add_argument("--tokenizer", help="tokenizer folder (default models/vq-digits)")
    p.add_argument("--steps", type=int), p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int), p.add_argument("--config", help="YAML run config")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    _common(p)
    p.set_defaults(func=cmd_train)


def _add_generate_parser(sub: Any) -> None:
    p = sub.add_parser("generate", help="iterative decoding from a run into PNG files",
                       epilog="example:\n  mage-bench generate --run runs/demo --num 64 --out runs/demo/samples",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True), p.add_argument("--num", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, help="decoding steps (default: the run's, 12)")
    p.add_argument("--temperature", type=float, help="Gumbel temperature of the re-masking (default 4.5)")
    p.add_argument("--seed", type=int, default=0), p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    _common(p)
    p.set_defaults(func=cmd_generate)


def _add_eval_settings(p: argparse.ArgumentParser) -> None:
    """The `EvalConfig` settings as flags (a sweep spec's `eval:` keys, with dashes); defaults from EvalConfig."""
    from mage_bench.config import EvalConfig
    from mage_bench.eval.linear import HeadSchedule

    d, head = EvalConfig(), HeadSchedule()
    p.add_argument("--num-samples", "--num", dest="num_samples", type=int,
                   help="images to generate from a run (all: default = as many as the reference split holds)")
    p.add_argument("--real-split", choices=["train", "test"], help=f"split of a --real data set (default {d.real_split})")
    p.add_argument("--extractor", help="inception-v3 (standard FID/IS) | digits-cnn (default for digits)")
    p.add_argument("--weights", help="extractor weights file (Inception: weights-inception-2015-12-05-6726825d.pth; "
                                     "also $MAGE_BENCH_INCEPTION_WEIGHTS)")
    p.add_argument("--backend", help=f"torch-fidelity | clean-fid | clean-fid-legacy (default {d.backend})")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help=f"default {d.device}")
    p.add_argument("--batch-size", type=int,
                   help="images per feature-extraction batch (default: 256 up to 128 px, 64 at 256 px)")
    p.add_argument("--layers", metavar="all|LIST",
                   help="linear/fewshot/knn: encoder blocks to probe, 0-based (last = depth - 1): last (default, "
                        "the official feature), all, or a list like 0,3,last; one forward pass for all")
    p.add_argument("--pooling", metavar="mean|cls|mean+cls",
                   help="linear/fewshot/knn: how a block's tokens become the feature: mean (default, official), "
                        "cls (class token), mean+cls (both, concatenated); several comma-separated")
    p.add_argument("--knn-ks", type=int, nargs="+", metavar="K",
                   help=f"kNN: neighbour counts (default {' '.join(map(str, d.knn_ks))})")
    p.add_argument("--knn-temperature", type=float, help=f"kNN: vote temperature (default {d.knn_temperature})")
    p.add_argument("--fewshot-shots", type=int, nargs="+", metavar="N",
                   help=f"few-shot: images per class (default {' '.join(map(str, d.fewshot_shots))})")
    p.add_argument("--fewshot-draws", type=int, help=f"few-shot: seeded draws per shot count (default {d.fewshot_draws})")
    p.add_argument("--probe-epochs", type=int, help=f"--protocol mae|mae-cached: epochs (default {head.epochs})")
    p.add_argument("--probe-batch-size", type=int,
                   help=f"--protocol mae|mae-cached: batch size (default {head.batch_size})")
    p.add_argument("--probe-blr", type=float,
                   help=f"--protocol mae|mae-cached: base lr, lr = blr * batch / 256 (default {head.blr})")
    p.add_argument("--masks", dest="inpaint", type=_mask_list, metavar="SPEC,...",
                   help="inpaint: masks, comma-separated: random:R (share R of tokens), box:center|half-left|"
                        "half-right|half-top|half-bottom, border:W (outpainting, W pixels), pixels:FILE (white = "
                        "unknown); all: also run inpaint with these")
    p.add_argument("--inpaint-images", type=int,
                   help=f"inpaint: test images completed per mask (default {d.inpaint_images})")
    p.add_argument("--inpaint-steps", "--steps", dest="inpaint_steps", type=int,
                   help="inpaint: decoding steps (default: the run's generate.steps)")
    p.add_argument("--inpaint-temperature", "--temperature", dest="inpaint_temperature", type=float,
                   help="inpaint: re-masking temperature (default: the run's generate.temperature)")
    p.add_argument("--inpaint-argmax", "--argmax", dest="inpaint_argmax", action="store_const", const=True,
                   help="inpaint: take the most likely code at each step instead of sampling it")
    p.add_argument("--inpaint-paste-back", "--paste-back", dest="inpaint_paste_back", action="store_const",
                   const=True, help="inpaint: paste the known input pixels over the decoded ones")
    p.add_argument("--inpaint-dilate", "--dilate", dest="inpaint_dilate", type=int,
                   help="inpaint: grow pixel masks' tokens by this many rings (default 0; the official demo used 1)")
    p.add_argument("--no-fd", dest="inpaint_fd", action="store_const", const=False,
                   help="inpaint: skip the FD/FID of completed images (no extractor needed)")


def _mask_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _add_inpaint_parser(sub: Any) -> None:
    p = sub.add_parser(
        "inpaint", help="complete masked images with a run (inpainting, outpainting) into PNG triplets",
        description="Mask each image (pixel masks are zeroed, then every token overlapping them is unknown), "
                    "keep the known tokens fixed and decode the unknown ones iteratively, seeded per image. "
                    "Writes NNNNNN-original.png, -masked.png, -result.png, grid.png and inpaint.json.",
        epilog="examples:\n  mage-bench inpaint --run runs/demo --images digits --mask box:center --out inpainted\n"
               "  mage-bench inpaint --run runs/demo --images photos/ --mask pixels:mask.png --out out --argmax",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--images", required=True, help="a folder of images, or a data set (its --split)")
    p.add_argument("--mask", required=True,
                   help="random:R | box:center|half-left|half-right|half-top|half-bottom | border:W (pixels) | "
                        "pixels:FILE (white = unknown, the images' size)")
    p.add_argument("--out", required=True, help="output folder (empty, or holding this same inpainting)")
    p.add_argument("--num", type=int, default=64, help="the first N images (default 64)")
    p.add_argument("--split", choices=["train", "test"], help="split of a data set (default test)")
    p.add_argument("--steps", type=int, help="decoding steps (default: the run's, 12)")
    p.add_argument("--temperature", type=float, help="re-masking temperature (default: the run's, 4.5)")
    p.add_argument("--argmax", action="store_true", help="take the most likely code instead of sampling it")
    p.add_argument("--paste-back", action="store_true", help="paste the known input pixels over the decoded ones")
    p.add_argument("--dilate", type=int, default=0, help="grow pixel masks' tokens by this many rings (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seeds the masks and the decoding, per image (default 0)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    _common(p)
    p.set_defaults(func=cmd_inpaint)


def _add_eval_parser(sub: Any) -> None:
    p = sub.add_parser(
        "eval", help="FID/IS/KID/PR, linear probe, few-shot, kNN, masked reconstruction, fine-tuning",
        description="Evaluate generation (fid: --real/--fake), representations (linear|fewshot|knn: --run), "
                    "masked reconstruction (inpaint: --run --masks), or all at once (all: --run).",
        epilog="examples:\n  mage-bench eval fid --real digits --fake runs/demo --num-samples 1000 --isc --kid\n"
               "  mage-bench eval fid --real imagenet_val_png/ --fake samples/ --weights "
               "weights-inception-2015-12-05-6726825d.pth\n  mage-bench eval all --run runs/demo\n"
               "  mage-bench eval fid --profile digits --fake runs/demo\n  mage-bench eval profiles",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("evaluator", choices=["fid", "linear", "fewshot", "knn", "inpaint", "finetune", "all", "profiles",
                                         "stats"])
    p.add_argument("--profile", metavar="NAME|FILE.yaml",
                   help="fid, all: an evaluation profile pinning the whole generation protocol (extractor and "
                        "weights, reference, sample counts, format, decoding, metrics); `eval profiles` lists them")
    p.add_argument("--decode", dest="decode_grid", nargs="+", metavar="KEY=V1,V2",
                   help="fid (--fake RUN), all: with --profile, also evaluate every decoding setting of the product, "
                        "e.g. --decode temperature=3,4.5,6 steps=8,12,20 (records fid-<profile>-decode.json)")
    p.add_argument("--stream-samples", action="store_const", const=True,
                   help="fid (--fake RUN), all: with --profile, hand a run's images from the decoder to the extractor "
                        "in memory (the pixels their PNGs would hold: the same features), writing no PNG files")
    p.add_argument("--out", help="stats: the .npz to write (mu, sigma, activations)")
    p.add_argument("--image-size", type=int, help="stats: pixel size of a --real data set's images (default: the data config's, 16)")
    p.add_argument("--run", help="run folder (linear, fewshot, knn, inpaint, finetune, all)")
    p.add_argument("--data", help="data set for the representation evaluators (default: the run's)")
    p.add_argument("--real", help="fid: reference images, a folder or a data set (digits, imagefolder:PATH, ...)")
    p.add_argument("--fake", help="fid: generated images, a folder, or a run folder (then --num-samples images "
                                  "are generated into RUN/samples)")
    _add_eval_settings(p)
    p.add_argument("--cache", help="cache for reference images and statistics (default ~/.cache/mage-bench, "
                                   "or $MAGE_BENCH_CACHE)")
    p.add_argument("--protocol", default="logreg", choices=["logreg", *MAE_PROTOCOLS],
                   help="linear: logreg (default: logistic regression on cached features, C chosen on held-out "
                        "data) | mae (the paper's probe: BatchNorm + linear head with LARS, 90 epochs, batch "
                        "4096, blr 0.1, trained on fresh random-resized-crop views through the frozen encoder "
                        "every epoch, tested on resize 292/256 + centre crop; one encoder pass per epoch, for "
                        "GPUs; records evaluator linear-mae) | mae-cached (the same head on the cached "
                        "centre-crop features, no augmentation: fast, not the paper's numbers; records "
                        "evaluator linear-mae-cached)")
    p.add_argument("--preset", help="finetune: vit_base | vit_large (the paper's recipes) | digits (CPU); default: "
                                    "digits for the digits data set, else by the run's model size")
    p.add_argument("--resume", action="store_true",
                   help="finetune: continue an interrupted fine-tuning (bitwise), or read back a finished one; "
                        "all: also read back every evaluator whose records were computed from the same inputs")
    p.add_argument("--finetune", metavar="PRESET",
                   help="all: also fine-tune the encoder with this preset, as `eval finetune --preset` (a sweep's "
                        "eval.finetune)")
    p.add_argument("--finetune-steps", type=int, metavar="N",
                   help="finetune: optimizer steps the warmup + cosine schedule spans, instead of the preset's "
                        "epochs (a shorter budget; recorded)")
    p.add_argument("--isc", action="store_true", help="also the Inception Score")
    p.add_argument("--kid", action="store_true", help="also KID")
    p.add_argument("--prc", action="store_true", help="also precision and recall")
    p.add_argument("--compare-backends", action="store_true",
                   help="fid: FID (and --kid) of the same images through torch-fidelity, clean-fid and clean-fid's "
                        "legacy PyTorch mode with the same extractor, and their differences (no record written)")
    _common(p)
    p.set_defaults(func=cmd_eval)


def _workers_arg(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a positive integer or auto, not {text!r}") from None


def _add_sweep_parser(sub: Any) -> None:
    p = sub.add_parser(
        "sweep", help="run a sweep spec (train, evaluate every run) and write its report",
        description="Expand a sweep spec into runs, refuse it when its points differ in anything but the swept "
                    "(or declared coupled) keys, train and evaluate each run (DONE runs are skipped, interrupted "
                    "ones resume), then write reports/<sweep>/. Exit 1 when some runs failed.",
        epilog="examples:\n  mage-bench sweep masking                 (the tiny preset: ~5 min on 2 CPU cores)\n"
               "  mage-bench sweep drop --preset digits --dry-run   (prints what differs between points)\n"
               "  mage-bench sweep masking-x-contrastive    (a 3 x 3 grid: heat maps in the report)\n"
               "  mage-bench sweep contrastive --preset cifar10 --executor slurm",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="masking | drop | contrastive | masking-x-contrastive | PATH.yaml")
    p.add_argument("--preset", help="tiny (default) | digits | cifar10 | paper, or one of the spec's own")
    p.add_argument("--executor", help="local (default) | torchrun | slurm")
    p.add_argument("--workers", type=_workers_arg,
                   help="local: runs side by side, each in its own process: N or auto (one per --threads cores "
                        "on the CPU); default: the spec's executor.workers")
    p.add_argument("--threads", type=int,
                   help="local, on the CPU: torch threads of each run (its last bits depend on them); default: "
                        "the spec's executor.threads")
    p.add_argument("--runs", help="run folders (default runs/<sweep>)")
    p.add_argument("--out", help="report folder (default reports/<sweep>)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the runs, what differs between points and what would execute, after checking the "
                        "FID extractor weights; run nothing")
    p.add_argument("--partition", help="slurm: partition (default: the spec's executor.slurm.partition)")
    p.add_argument("--gpus", type=int, help="slurm: GPUs per node")
    p.add_argument("--time-min", type=int, help="slurm: time limit per run, minutes")
    p.add_argument("--mem-gb", type=int, help="slurm: memory per node, GB")
    _common(p)
    p.set_defaults(func=cmd_sweep)


def _add_report_parser(sub: Any) -> None:
    p = sub.add_parser("report", help="collate run folders into results.csv, summary.csv and index.html",
                       epilog="example:\n  mage-bench report runs/masking --out reports/masking",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="a sweep's runs folder, run folders, or folders of runs")
    p.add_argument("--out", help="report folder")
    _common(p)
    p.set_defaults(func=cmd_report)


def _add_import_parser(sub: Any) -> None:
    p = sub.add_parser("import", help="import official checkpoints into models/NAME",
                       description="Import official weights strictly and safely (weights_only=True).")
    p.add_argument("path", help="official checkpoint, e.g. vqgan_jax_strongaug.ckpt")
    p.add_argument("--kind", choices=["mage", "vqgan"], required=True)
    p.add_argument("--out", required=True, help="models/NAME")
    _common(p)
    p.set_defaults(func=cmd_import)


def _add_bench_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="benchmarks: training throughput, FLOPs per step, MFU")
    p.add_argument("what", choices=["train", "knn", "eval", "fid"],
                   help="train: throughput/MFU; knn: faiss vs scikit-learn (50k x 768, 10k queries); eval: eval "
                        "all vs one feature pass (--run); fid: cached reference, first vs second call (--run)")
    p.add_argument("--run", help="run folder for `bench eval` and `bench fid`")
    p.add_argument("--models", nargs="+", default=["mage_tiny", "mage_small"])
    p.add_argument("--batch-size", type=int, default=128), p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--compile", action="store_true",
                   help="train: the objective through torch.compile, as train.compile (warm-up steps compile)")
    p.add_argument("--workers", type=int, default=1,
                   help="train, CPU: time this many runs side by side, as the local executor's executor.workers "
                        "(the row sums their images/s; MFU against the whole machine's matmul peak)")
    p.add_argument("--threads", type=int, help="train, CPU: torch threads of each run (default: torch's)")
    _common(p)
    p.set_defaults(func=cmd_bench)


def _add_tokenizer_parser(sub: Any) -> None:
    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    t = tsub.add_parser("train", help="train a VQGAN tokenizer on your data",
                        description="Train a small VQGAN tokenizer. Precedence: CLI flags > --config file > defaults.",
                        epilog="example:\n  mage-bench tokenizer train --data digits --out models/vq-digits",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--data", help="digits | imagefolder:PATH | cifar10:ROOT (default digits)")
    t.add_argument("--out", required=True, help="output folder, e.g. models/vq-digits")
    t.add_argument("--config", help="YAML file with seed/data/tokenizer/train sections")
    t.add_argument("--tokenizer", help="preset to start from (vq_digits, vqgan_mage)")
    t.add_argument("--image-size", type=int), t.add_argument("--steps", type=int)
    t.add_argument("--batch-size", type=int), t.add_argument("--seed", type=int)
    t.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto (default: a GPU when one is visible) | cpu | cuda; the weights and card are the same")
    _common(t)
    t.set_defaults(func=cmd_tokenizer_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mage-bench", description="Train, sweep and evaluate MAGE (MAsked Generative Encoder).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"mage-bench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train_parser(sub)
    _add_generate_parser(sub)
    _add_inpaint_parser(sub)
    _add_eval_parser(sub)
    _add_sweep_parser(sub)
    _add_report_parser(sub)
    _add_import_parser(sub)
    _add_bench_parser(sub)
    _add_tokenizer_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UserError as exc:
        print(f"mage-bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mage-bench: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print("mage-bench: internal error (a bug): please report it with the traceback above", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
