"""The training skeleton MAGE training (`mage_bench.train`) and tokenizer training
(`mage_bench.tokenizer.train`) share: the output folder, resume, the loop and its log.

A trainer plugs in its steps (`Steps`: one optimisation step, the log record, the checkpoint) and
its `load`; the skeleton does the rest, the same way for both:

- the folder: `--out` must be a folder, one holding a training state is continued only with
  `--resume` (`check_output_folder`); resuming loads the state, refuses another config and drops the
  log lines written after the state (`TrainingFolder.begin`); a fresh start writes config.yaml and
  removes an old metrics.jsonl;
- the loop (`run_steps`): a progress bar, a metrics.jsonl line every `log_every` steps and at the end,
  a checkpoint every `checkpoint_every` steps, at the end and at `stop_at` (which stops early as an
  interruption would), and a `TrainingFailed` that names the last good checkpoint.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mage_bench.config import dump_yaml, require_same_config, run_identity
from mage_bench.io import atomic_torch_save, atomic_write_text, rewind_jsonl, safe_torch_load
from mage_bench.runs import CONFIG_FILE, METRICS_FILE


def rng_state(device: Any) -> dict[str, Any]:
    """This process's global random state: the CPU's and, on a GPU, that device's (dropout and other
    random ops on the GPU draw from it, so a resumed run must not replay it from the start)."""
    import torch

    state = {"cpu": torch.get_rng_state()}
    if getattr(device, "type", device) == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Any, device: Any) -> None:
    """Restore a `rng_state` (or, from checkpoints before device states were saved, a CPU state tensor)."""
    import torch

    if isinstance(state, torch.Tensor):
        torch.set_rng_state(state)
        return
    torch.set_rng_state(state["cpu"])
    if getattr(device, "type", device) == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class TrainingFailed(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the last good checkpoint."""


class Steps(Protocol):
    """What a trainer plugs into `run_steps`."""

    failure_hint: str  # what to change after a `TrainingFailed`, e.g. "lower train.lr"

    def train_step(self, step: int) -> None:
        """Optimisation step `step` (counted from 0); a non-finite loss raises `TrainingFailed` (here, or
        from `log_record`/`state` when the step's losses are read later)."""

    def log_record(self, step: int, time_s: float) -> dict[str, Any]:
        """The metrics.jsonl record after `step` steps, `time_s` seconds of training in."""

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        """What the progress bar shows of `record`."""

    def state(self, step: int, elapsed: float) -> dict[str, Any] | None:
        """The checkpoint after `step` steps (None on processes that do not write it)."""


@dataclass(frozen=True)
class Cadence:
    """How long the loop runs and when it logs and checkpoints."""

    steps: int
    log_every: int
    checkpoint_every: int

    def logs_at(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.steps

    def checkpoints_at(self, step: int, stop_at: int | None) -> bool:
        return step % self.checkpoint_every == 0 or step == self.steps or step == stop_at


@dataclass(frozen=True)
class TrainingFolder:
    """A trainer's output folder: its training state `state_file`, config.yaml and metrics.jsonl.

    Only the main process (`is_main`) writes the folder; the others read the state when resuming.
    """

    path: Path
    state_file: str
    is_main: bool = True

    @property
    def state_path(self) -> Path:
        return self.path / self.state_file

    @property
    def log_path(self) -> Path:
        return self.path / METRICS_FILE

    def begin(self, config: Any, resume: bool,
              load: Callable[[dict[str, Any]], tuple[int, float]]) -> tuple[int, float]:
        """Continue from the folder's state (`resume` and one exists: `load` takes it and returns
        (step, elapsed seconds)) or start the folder afresh at (0, 0.0)."""
        if resume and self.state_path.exists():
            state = safe_torch_load(self.state_path)
            require_same_config(state["config"], config, str(self.path), identity=run_identity)
            step, elapsed = load(state)
            if self.is_main:  # lines logged after the state was saved are logged again from it
                rewind_jsonl(self.log_path, step)
            return step, elapsed
        if self.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path / CONFIG_FILE, dump_yaml(config))
            self.log_path.unlink(missing_ok=True)
        return 0, 0.0

    def last_good(self) -> str:
        """The checkpoint a failed run can be resumed from, in words."""
        return str(self.state_path) if self.state_path.exists() else "not written yet"


def run_steps(steps: Steps, folder: TrainingFolder, cadence: Cadence, start: tuple[int, float],
              stop_at: int | None = None, progress: bool = True, desc: str = "train") -> tuple[int, float]:
    """Train from `start` = (step, elapsed seconds) to `cadence.steps` (or `stop_at`), logging and
    checkpointing on the way; returns (step, elapsed seconds at the last checkpoint)."""
    from tqdm import tqdm

    step, elapsed = start
    bar = tqdm(total=cadence.steps, initial=step, desc=desc, unit="step", file=sys.stderr,
               disable=not (progress and folder.is_main), dynamic_ncols=True)
    log = open(folder.log_path, "a") if folder.is_main else None  # noqa: SIM115 (closed in finally)
    tic = time.perf_counter()
    try:
        while step < cadence.steps and (stop_at is None or step < stop_at):
            steps.train_step(step)
            step += 1
            bar.update(1)
            if cadence.logs_at(step):
                record = steps.log_record(step, elapsed + time.perf_counter() - tic)
                if log:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                bar.set_postfix(**steps.postfix(record))
            if cadence.checkpoints_at(step, stop_at):
                now = time.perf_counter()
                elapsed, tic = elapsed + now - tic, now
                state = steps.state(step, elapsed)  # collective under DDP: every process asks
                if state is not None:
                    atomic_torch_save(state, folder.state_path)
    except TrainingFailed as exc:  # from a step, or from reading a window's losses: name what to resume from
        raise type(exc)(f"{exc}; the last good checkpoint is {folder.last_good()}; {steps.failure_hint}") from None
    finally:
        bar.close()
        if log:
            log.close()
    return step, elapsed
