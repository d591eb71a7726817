"""The shared training skeleton (`mage_bench.training`) and the one lr schedule (`mage_bench.schedule`)."""

import json
import math

import pytest
import yaml

from mage_bench.config import RunConfig, TokenizerTrainConfig, resolve_config
from mage_bench.errors import UserError
from mage_bench.eval.linear import HeadSchedule
from mage_bench.io import safe_torch_load
from mage_bench.tokenizer.train import TrainingDiverged
from mage_bench.tokenizer.train import lr_at as tokenizer_lr_at
from mage_bench.train import lr_at as mage_lr_at
from mage_bench.training import Cadence, TrainingFailed, TrainingFolder, run_steps

# --------------------------------------------------------------------------------------------
# The schedule: bitwise the three formulas it replaced (written out here as they were)


def _old_mage(step, base_lr, steps, warmup, min_lr):
    if step < warmup:
        return base_lr * step / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _old_tokenizer(step, lr, steps, warmup, min_lr_ratio):
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _old_head(progress, lr, epochs, warmup):
    warmup = warmup or 0
    if progress < warmup:
        return lr * progress / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (progress - warmup) / max(epochs - warmup, 1)))


@pytest.mark.parametrize("steps, warmup, blr, batch", [
    (1500, 75, 3e-3, 128), (6, 2, 0.01, 16), (40, 10, 3e-3, 32), (300, 0, 1.5e-4, 4096), (10, 10, 3e-3, 128),
    (5, 20, 3e-3, 128), (1000, 7, 1e-3, 96)])
def test_mage_schedule_is_bitwise_the_old_formula(steps, warmup, blr, batch):
    config = resolve_config(RunConfig, {"train": {"steps": steps, "warmup_steps": warmup, "blr": blr,
                                                  "batch_size": batch}})
    assert config.train.min_lr == 0.0  # the floor every preset uses: exact
    base_lr = blr * batch / 256
    for step in range(steps + 1):
        assert mage_lr_at(step, base_lr, config) == _old_mage(step, base_lr, steps, warmup, 0.0), step


@pytest.mark.parametrize("steps, warmup, lr, ratio", [
    (1000, 50, 2e-3, 0.05), (12, 2, 2e-3, 0.05), (60, 10, 2e-3, 0.05), (6, 2, 2e-3, 0.05), (30, 0, 1e-3, 0.0),
    (10, 10, 2e-3, 0.1), (777, 33, 3e-4, 0.3)])
def test_tokenizer_schedule_is_bitwise_the_old_formula(steps, warmup, lr, ratio):
    cfg = TokenizerTrainConfig(steps=steps, warmup_steps=warmup, lr=lr, min_lr_ratio=ratio)
    for step in range(steps + 1):
        assert tokenizer_lr_at(step, cfg) == _old_tokenizer(step, lr, steps, warmup, ratio), step


@pytest.mark.parametrize("epochs, batch, blr, warmup, per_epoch", [
    (90, 4096, 0.1, None, 1), (90, 4096, 0.1, None, 7), (90, 256, 0.1, None, 13), (2, 8, 0.1, None, 5),
    (20, 256, 0.05, 2, 3), (5, 64, 0.1, 5, 4), (30, 512, 0.1, 0, 11)])
def test_head_schedule_is_bitwise_the_old_formula(epochs, batch, blr, warmup, per_epoch):
    schedule = HeadSchedule(epochs, batch, blr, warmup).checked("test")
    for epoch in range(epochs):
        for i in range(per_epoch):
            progress = epoch + i / per_epoch
            old = _old_head(progress, schedule.lr, epochs, schedule.warmup_epochs)
            assert schedule.lr_at(progress) == old, progress


# --------------------------------------------------------------------------------------------
# The skeleton, with a trainer that only counts


class CountingSteps:
    failure_hint = "lower the count"

    def __init__(self, fail_at=None, error=TrainingFailed):
        self.done, self.fail_at, self.error = [], fail_at, error

    def train_step(self, step):
        if step == self.fail_at:
            raise self.error(f"bad step {step}")
        self.done.append(step)

    def log_record(self, step, time_s):
        return {"step": step, "done": len(self.done), "time_s": time_s}

    def postfix(self, record):
        return {"done": str(record["done"])}

    def state(self, step, elapsed):
        return {"config": CONFIG, "step": step, "elapsed_s": elapsed, "done": list(self.done)}

    def load(self, state):
        self.done = list(state["done"])
        return state["step"], state["elapsed_s"]


CONFIG = {"seed": 0, "train": {"steps": 10}}
CADENCE = Cadence(steps=10, log_every=3, checkpoint_every=4)


def _log_steps(folder):
    return [json.loads(line)["step"] for line in folder.log_path.read_text().splitlines()]


def test_a_fresh_folder_gets_its_config_log_and_checkpoints(tmp_path):
    folder = TrainingFolder(tmp_path / "run", "state.pt")
    steps = CountingSteps()
    start = folder.begin(CONFIG, False, steps.load)
    assert start == (0, 0.0) and yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()) == CONFIG
    assert run_steps(steps, folder, CADENCE, start, progress=False)[0] == 10
    assert _log_steps(folder) == [3, 6, 9, 10]  # every log_every steps, and the last
    assert safe_torch_load(folder.state_path)["done"] == list(range(10))


def test_stop_at_checkpoints_and_resume_continues_with_the_log_rewound(tmp_path):
    folder = TrainingFolder(tmp_path / "run", "state.pt")
    first = CountingSteps()
    step, _ = run_steps(first, folder, CADENCE, folder.begin(CONFIG, False, first.load), stop_at=5, progress=False)
    assert step == 5 and safe_torch_load(folder.state_path)["step"] == 5  # saved at stop_at, off the cadence
    with folder.log_path.open("a") as log:  # a line written after the checkpoint, before a crash
        log.write(json.dumps({"step": 6}) + "\n")
    again = CountingSteps()
    start = folder.begin(CONFIG, True, again.load)
    assert start[0] == 5 and _log_steps(folder) == [3]
    run_steps(again, folder, CADENCE, start, progress=False)
    assert again.done == list(range(10)) and _log_steps(folder) == [3, 6, 9, 10]


def test_resume_refuses_another_config(tmp_path):
    folder = TrainingFolder(tmp_path / "run", "state.pt")
    steps = CountingSteps()
    run_steps(steps, folder, CADENCE, folder.begin(CONFIG, False, steps.load), stop_at=4, progress=False)
    with pytest.raises(UserError, match="config differs .*sections: train"):
        folder.begin({**CONFIG, "train": {"steps": 11}}, True, CountingSteps().load)


@pytest.mark.parametrize("error", [TrainingFailed, TrainingDiverged])
def test_a_failure_names_the_last_good_checkpoint(tmp_path, error):
    folder = TrainingFolder(tmp_path / "run", "state.pt")
    steps = CountingSteps(fail_at=6, error=error)
    with pytest.raises(error, match=r"^bad step 6; the last good checkpoint is .*state.pt; lower the count$"):
        run_steps(steps, folder, CADENCE, folder.begin(CONFIG, False, steps.load), progress=False)
    assert safe_torch_load(folder.state_path)["step"] == 4
    early = TrainingFolder(tmp_path / "early", "state.pt")
    with pytest.raises(TrainingFailed, match="the last good checkpoint is not written yet"):
        run_steps(CountingSteps(fail_at=1), early, CADENCE, early.begin(CONFIG, False, None), progress=False)


def test_only_the_main_process_writes(tmp_path):
    folder = TrainingFolder(tmp_path / "run", "state.pt", is_main=False)
    steps = CountingSteps()
    steps.state = lambda step, elapsed: None  # what a DDP rank other than 0 returns
    assert run_steps(steps, folder, CADENCE, folder.begin(CONFIG, False, steps.load), progress=False)[0] == 10
    assert not (tmp_path / "run").exists()
