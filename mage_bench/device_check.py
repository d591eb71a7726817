"""The prepared GPU check (`scripts/device-check`): one command, a JSON summary and a log under --out.

A lent GPU machine is had for minutes, with no package registry, so everything it should measure runs from
here in one go, each stage timed and bounded by what is left of the budget:

- environment: Python, torch, the device, its bf16 (GPU) or fp32 (CPU) matmul rate measured here;
- gpu_tests: `pytest -m gpu` (bf16 vs fp32 training step of ViT-B, CUDA vs CPU generation, kNN, FID,
  torchrun with nccl, a compiled step against eager); skipped tests are counted, not hidden;
- bench_train: `bench train` of mage_vit_base_patch16 and mage_vit_large_patch16 (images/s, tokens/s,
  MFU against the matmul rate of the same process, peak memory), and ViT-B again compiled (`train.compile`);
- generate: images/s of 256 px generation (ViT-B, 20 steps, temperature 6.0, VQGAN decode) at the best
  batch, in fp32 (what `generate` runs today) and under bf16 autocast;
- inception: images/s of Inception-v3 features (random weights: the speed does not depend on them);
- projection: the wall time of a 50k-sample FID from those rates (generation, then features of the 50k
  generated and 50k uncached reference images).

Without CUDA the same stages run at toy sizes (profile "cpu-smoke": mage_tiny, the digits tokenizer, 64 px
Inception), so the script's own logic is tested on CPU; the summary then says plainly that no GPU figure
was measured. A failing stage is recorded with its one-line error and the others still run.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUMMARY_FILE, LOG_FILE, JUNIT_FILE = "device-check.json", "device-check.log", "gpu-tests.xml"
FID_SAMPLES = 50_000


@dataclass(frozen=True)
class Profile:
    """The sizes one run of the check uses: the real ones on a GPU, toy ones on CPU."""

    name: str
    device: str
    train_models: tuple[str, ...]
    compiled_models: tuple[str, ...]  # benched again with train.compile
    train_batch: int
    train_steps: int
    generate: dict[str, Any]
    inception: dict[str, Any]


GPU = Profile("gpu", "cuda", ("mage_vit_base_patch16", "mage_vit_large_patch16"), ("mage_vit_base_patch16",), 128, 10,
              {"model": "mage_vit_base_patch16", "tokenizer": "vqgan_mage", "steps": 20, "temperature": 6.0,
               "batches": (64, 128, 256)},
              {"batches": (128, 256, 512), "size": 256})
# No compiled bench on CPU: inductor's first compilation alone takes ~40 s on 2 cores.
CPU_SMOKE = Profile("cpu-smoke", "cpu", ("mage_tiny",), (), 8, 2,
                    {"model": "mage_tiny", "tokenizer": "vq_digits", "steps": 4, "temperature": 4.5, "batches": (4,),
                     "repeats": 1},
                    {"batches": (2,), "size": 64, "repeats": 1})


class Log:
    """Lines to stdout and to the log file as they happen (a killed check keeps what it printed)."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("a", encoding="utf-8")

    def __call__(self, line: str) -> None:
        stamped = f"[{time.strftime('%H:%M:%S')}] {line}"
        print(stamped, flush=True)
        self.file.write(stamped + "\n")
        self.file.flush()


def _environment(profile: Profile, ctx: dict[str, Any]) -> dict[str, Any]:
    import torch

    from mage_bench.bench import matmul_peak

    dev = torch.device(profile.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    peak = matmul_peak(dev, dtype, sizes=(4096, 8192) if dev.type == "cuda" else (512,), repeats=5)
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
           "matmul_dtype": str(dtype).removeprefix("torch."), "matmul_tflops": peak / 1e12}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        out.update({"device_name": props.name, "capability": f"{props.major}.{props.minor}",
                    "memory_gb": props.total_memory / 2**30, "bf16_native": torch.cuda.is_bf16_supported()})
    ctx["peak"] = peak
    return out


def _gpu_tests(profile: Profile, ctx: dict[str, Any]) -> dict[str, Any]:
    import xml.etree.ElementTree as ET

    junit = ctx["out"] / JUNIT_FILE
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs",
               f"--junitxml={junit}", str(Path(__file__).resolve().parents[1] / "tests")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=ctx["left"](), check=False)
    for line in (done.stdout + done.stderr).splitlines()[-40:]:
        ctx["log"](f"  pytest: {line}")
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = [case.get("name") for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    if failed or done.returncode not in (0, 5):
        raise RuntimeError(f"pytest -m gpu exit {done.returncode}; failed: {', '.join(failed) or 'none listed'}")
    return {**counts, "exit_code": done.returncode}


def _bench_train(profile: Profile, ctx: dict[str, Any]) -> dict[str, Any]:
    import torch

    from mage_bench.bench import bench_model

    dev = torch.device(profile.device)
    rows = []
    runs = [(name, False) for name in profile.train_models] + [(name, True) for name in profile.compiled_models]
    for name, compiled in runs:
        result = bench_model(name, profile.train_batch, profile.train_steps, dev, ctx["peak"], compile=compiled)
        rows.append(result.as_dict())
        ctx["log"](f"  {name}{' (compiled)' if compiled else ''}: {result.images_per_s:.1f} img/s, MFU "
                   f"{100 * result.mfu:.1f}%, peak memory "
                   f"{result.peak_memory_gb if result.peak_memory_gb is not None else '-'} GB")
    return {"models": rows}


def _generate(profile: Profile, ctx: dict[str, Any]) -> dict[str, Any]:
    from mage_bench.bench import bench_generate

    settings = {**profile.generate, "device": profile.device}
    out = {"fp32": bench_generate(**settings)}
    if profile.device == "cuda":
        out["bf16"] = bench_generate(**settings, bf16=True)
    ctx["generate_ips"] = max(r["images_per_s"] for r in out.values())
    return out


def _inception(profile: Profile, ctx: dict[str, Any]) -> dict[str, Any]:
    from mage_bench.bench import bench_inception
    from mage_bench.eval.extractors import write_random_inception_weights

    with tempfile.TemporaryDirectory() as folder:
        weights = write_random_inception_weights(Path(folder) / "inception-random.pth")
        out = bench_inception(weights, device=profile.device, **profile.inception)
    ctx["inception_ips"] = out["images_per_s"]
    return out


def _projection(profile: Profile, ctx: dict[str, Any]) -> dict[str, Any]:
    from mage_bench.bench import projected_fid_seconds

    if "generate_ips" not in ctx or "inception_ips" not in ctx:
        raise RuntimeError("needs the generate and inception stages' rates")
    seconds = projected_fid_seconds(ctx["generate_ips"], ctx["inception_ips"], FID_SAMPLES, FID_SAMPLES)
    return {"num_generated": FID_SAMPLES, "num_real_uncached": FID_SAMPLES, "projected_s": seconds,
            "projected_minutes": seconds / 60, "generation_images_per_s": ctx["generate_ips"],
            "extraction_images_per_s": ctx["inception_ips"]}


STAGES: tuple[tuple[str, Callable[[Profile, dict[str, Any]], dict[str, Any]]], ...] = (
    ("environment", _environment), ("gpu_tests", _gpu_tests), ("bench_train", _bench_train),
    ("generate", _generate), ("inception", _inception), ("projection", _projection),
)


def run_device_check(out: str | Path, budget_s: float = 480.0, stages: tuple[str, ...] | None = None,
                     profile: Profile | None = None) -> dict[str, Any]:
    """Run the stages (all, or those named) within `budget_s` seconds; write SUMMARY_FILE (after every stage,
    atomically) and LOG_FILE under `out`; return the summary."""
    import torch

    from mage_bench.io import atomic_write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    profile = profile or (GPU if torch.cuda.is_available() else CPU_SMOKE)
    start = time.perf_counter()
    log = Log(out / LOG_FILE)
    ctx: dict[str, Any] = {"out": out, "log": log, "left": lambda: max(1.0, budget_s - (time.perf_counter() - start))}
    summary: dict[str, Any] = {
        "profile": profile.name, "budget_s": budget_s, "stages": {},
        "note": None if profile.name == "gpu" else "no CUDA device: the stages ran at toy sizes on CPU to test the "
                                                   "check itself; no GPU figure was measured"}
    log(f"device check, profile {profile.name}, budget {budget_s:.0f} s")
    for name, stage in STAGES:
        if stages is not None and name not in stages:
            continue
        if time.perf_counter() - start > budget_s:
            summary["stages"][name] = {"status": "skipped", "reason": "the time budget is spent"}
            log(f"{name}: skipped (budget spent)")
            continue
        tic = time.perf_counter()
        log(f"{name}: start")
        try:
            result = {"status": "ok", **stage(profile, ctx)}
        except Exception as exc:  # recorded, and the next stage still runs
            result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
            log(traceback.format_exc().rstrip())
        result["seconds"] = time.perf_counter() - tic  # the stage's own wall time
        summary["stages"][name] = result
        log(f"{name}: {result['status']} in {result['seconds']:.1f} s")
        summary["total_s"] = time.perf_counter() - start
        atomic_write_json(out / SUMMARY_FILE, summary)
    summary["total_s"] = time.perf_counter() - start
    summary["ok"] = all(s["status"] != "failed" for s in summary["stages"].values())
    atomic_write_json(out / SUMMARY_FILE, summary)
    log(f"done in {summary['total_s']:.0f} s: " + ", ".join(f"{k} {v['status']}" for k, v in summary["stages"].items()))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mage_bench.device_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for device-check.json, device-check.log, gpu-tests.xml")
    parser.add_argument("--budget-s", type=float, default=480.0, help="stop starting stages after this (default 480)")
    parser.add_argument("--stages", help=f"comma-separated subset of {', '.join(n for n, _ in STAGES)}")
    args = parser.parse_args(argv)
    names = tuple(s.strip() for s in args.stages.split(",")) if args.stages else None
    unknown = sorted(set(names or ()) - {n for n, _ in STAGES})
    if unknown:
        print(f"mage-bench: unknown stage {unknown[0]!r}; choose from {', '.join(n for n, _ in STAGES)}",
              file=sys.stderr)
        return 2
    summary = run_device_check(args.out, args.budget_s, names)
    print(json.dumps({k: v.get("status") for k, v in summary["stages"].items()}))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
