"""The run directory contract (ARCHITECTURE.md): the names of a run folder's and a sweep folder's files,
defined once (the torch-free report imports them too), and loading a trained run back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mage_bench.errors import UserError

# A run folder (the run directory contract)
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
EVAL_DIR = "eval"  # result records, one NAME.json per evaluator
EVAL_INPUTS_DIR = "inputs"  # eval/inputs/NAME.json: what eval/NAME.json was computed from (`eval.runner` resume)
SAMPLES_DIR = "samples"
DONE_FILE = "DONE"
LAUNCH_FILE = "launch.json"  # how it was trained: processes (world size), batch per process, global batch, lr
# ... in a sweep, also:
RUN_META = "sweep-run.json"  # the run's sweep point, seed and config hash
FAILED_FILE = "FAILED"
TIMING_FILE = "timing.json"

# A sweep's runs folder
SWEEP_FILE = "sweep.json"  # the expanded sweep: points, runs, densities, timings (what the report reads)
SHARED_DIR = "_shared"  # the tokenizer and the FID reference cache every run shares
REFERENCE_DIR = "_reference"  # the reference rows
# The reference rows' run names (their records' `run` field) and how the report labels them. The
# untrained model is a run folder `_reference/untrained`; the others are record files in `_reference/`.
RAW_PIXELS_RUN = "reference-raw-pixels"
UNTRAINED_RUN = "untrained"
REAL_HELDOUT_RUN = "reference-real-{split}"  # real images of the split the reference does not use
REFERENCE_LABELS = {RAW_PIXELS_RUN: "reference: raw pixels", UNTRAINED_RUN: "reference: untrained model",
                    **{REAL_HELDOUT_RUN.format(split=s): "reference: real held-out images" for s in ("train", "test")}}


def read_launch(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's LAUNCH_FILE (how it trains: processes, global batch, lr), or None before training wrote it."""
    import json

    path = Path(run_dir) / LAUNCH_FILE
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass(frozen=True)
class LoadedRun:
    config: Any  # RunConfig
    model: Any  # MAGE, eval mode
    tokenizer: Any  # VQGAN, eval mode
    step: int
    checkpoint_sha256: str
    path: Path  # the run folder


def load_run(run_dir: str | Path, device: str = "cpu") -> LoadedRun:
    """The model (weights of checkpoint.pt), its tokenizer and resolved config, ready for inference."""
    from mage_bench.config import RunConfig, from_dict
    from mage_bench.io import safe_torch_load, sha256_file
    from mage_bench.mage.model import MAGE
    from mage_bench.tokenizer import load_tokenizer

    run = Path(run_dir)
    checkpoint = run / CHECKPOINT_FILE
    if not checkpoint.is_file():
        raise UserError(f"{run} is not a trained run (no {CHECKPOINT_FILE}); train it with mage-bench train --out {run}")
    state = safe_torch_load(checkpoint)
    config = from_dict(RunConfig, state["config"], "config")
    model = MAGE(config.model)
    model.load_state_dict(state["model"])
    tokenizer = load_tokenizer(config.tokenizer)
    return LoadedRun(config, model.to(device).eval(), tokenizer.to(device).eval(), int(state["step"]),
                     sha256_file(checkpoint), run)


def resolve_device(name: str) -> str:
    """auto -> cuda when visible, else cpu; cuda without a GPU is a one-line error."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible")
    return name


def records_inputs_file(records_file: Path) -> Path:
    """Where the inputs of a records file are kept: RUN/eval/NAME.json -> RUN/eval/inputs/NAME.json (outside
    RUN/eval/*.json, which readers take for result records)."""
    return Path(records_file).parent / EVAL_INPUTS_DIR / Path(records_file).name
