import json

import pytest
import torch
import yaml

from mage_bench.config import RunConfig, resolve_config
from mage_bench.errors import ConfigError, UserError
from mage_bench.io import safe_torch_load
from mage_bench.train import TrainingFailed, train


@pytest.fixture(autouse=True)
def _outside_the_checkout(tmp_path, monkeypatch):
    """Runs start in tmp_path: the FD proxy reads models/digits-cnn from the working folder, so weights that
    another process puts into the checkout mid-test cannot make two runs of one test differ."""
    monkeypatch.chdir(tmp_path)


def _config(layer, **sections):
    return resolve_config(RunConfig, layer, sections or None)


def _weights(run):
    return safe_torch_load(run / "checkpoint.pt")["model"]


def test_training_writes_the_run_directory_contract(tmp_path, tiny_run_layer):
    summary = train(_config(tiny_run_layer), tmp_path / "run", progress=False)
    assert summary["finished"] and summary["step"] == 6
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["masking"]["mask_ratio_min"] == 0.5  # "auto" recorded as the value used
    assert resolved["masking"]["spec"] == "truncnorm:mean=0.55,std=0.25,min=0.5,max=1.0"
    assert resolved["train"]["augment"] == "none"
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert {"step", "epoch", "loss", "loss_recon", "lr", "mask_ratio", "time_s"} <= set(log[0])
    assert log[0]["lr"] == 0.0  # the official warmup starts from zero
    state = safe_torch_load(tmp_path / "run" / "checkpoint.pt")
    assert state["step"] == 6 and {"optimizer", "scaler", "scheduler", "data", "mask_generator", "torch_rng"} <= set(state)


def test_training_lowers_the_loss(tmp_path, tiny_run_layer):
    layer = {**tiny_run_layer, "train": {**tiny_run_layer["train"], "steps": 100, "batch_size": 32}}
    train(_config(layer), tmp_path / "run", progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(losses[:3]) / 3, sum(losses[-10:]) / 10
    assert last < first - 0.1, (first, last)


@pytest.mark.parametrize("extra", [{}, {"contrastive": {"weight": 0.5}, "masking": {"per": "sample"}}],
                         ids=["mage", "mage-c"])
def test_resume_is_bitwise_exact(tmp_path, tiny_run_layer, extra):
    layer = {**tiny_run_layer, **extra, "model": {**tiny_run_layer["model"], "dropout": 0.1}}
    cfg = _config(layer)
    train(cfg, tmp_path / "straight", progress=False)
    assert train(cfg, tmp_path / "split", progress=False, stop_at=3)["step"] == 3
    train(cfg, tmp_path / "split", resume=True, progress=False)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    log_a = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    log_b = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "time_s"} for x in lines]  # noqa: E731
    assert strip(log_a) == strip(log_b)


def test_resume_guards(tmp_path, tiny_run_layer):
    cfg = _config(tiny_run_layer)
    train(cfg, tmp_path / "run", progress=False, stop_at=3)
    with pytest.raises(UserError, match="already holds a checkpoint; pass --resume"):
        train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(UserError, match="config differs .*sections: train"):
        train(_config(tiny_run_layer, train={"blr": 0.5}), tmp_path / "run", resume=True, progress=False)
    train(cfg, tmp_path / "run", resume=True, progress=False)
    assert train(cfg, tmp_path / "run", resume=True, progress=False)["finished"]  # finished: a no-op


def test_contrastive_weight_zero_skips_the_second_view(tmp_path, tiny_run_layer, monkeypatch):
    from mage_bench.mage import objective as objective_module

    calls = []
    original = objective_module.info_nce
    monkeypatch.setattr(objective_module, "info_nce", lambda *a: calls.append(1) or original(*a))
    train(_config(tiny_run_layer), tmp_path / "plain", progress=False)
    assert not calls
    log = json.loads((tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "loss_contrastive" not in log
    train(_config(tiny_run_layer, contrastive={"weight": 0.1}), tmp_path / "c", progress=False)
    assert len(calls) == 6
    log = json.loads((tmp_path / "c" / "metrics.jsonl").read_text().splitlines()[-1])
    assert torch.isfinite(torch.tensor(log["loss_contrastive"]))
    assert yaml.safe_load((tmp_path / "c" / "config.yaml").read_text())["train"]["augment"] == "affine"


def test_contrastive_loss_decreases_on_a_toy_batch(tiny_model_overrides):
    from mage_bench.mage import create_model
    from mage_bench.mage.masking import sample_token_masks
    from mage_bench.train import MageObjective

    torch.manual_seed(0)
    cfg = _config({"model": tiny_model_overrides, "contrastive": {"weight": 1.0}})
    objective = MageObjective(create_model("mage_tiny", **tiny_model_overrides), cfg)
    opt = torch.optim.AdamW(objective.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 32, (16, 64), generator=g)
    second = tokens.clone()
    second[:, ::7] = torch.randint(0, 32, second[:, ::7].shape, generator=g)  # a perturbed "view"
    mask, drop = sample_token_masks(torch.full((16,), 0.6), 64, 0.5, g)
    mask2, drop2 = sample_token_masks(torch.full((16,), 0.6), 64, 0.5, g)
    history = []
    for _ in range(30):
        losses = objective(tokens, mask, drop, (second, mask2, drop2))
        history.append(float(losses["loss_contrastive"].detach()))
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    assert all(torch.isfinite(torch.tensor(history)))
    assert history[-1] < 0.5 * history[0]


@pytest.mark.parametrize("cadence, message", [
    ({}, r"non-finite loss \(nan\) at step 4; the last good checkpoint is .*checkpoint.pt"),
    # The losses are read once per record: a checkpoint between records reads them first, so the
    # state after the bad step is never saved.
    ({"steps": 8, "log_every": 4, "checkpoint_every": 3},
     r"non-finite loss \(nan\) between steps 4 and 5; the last good checkpoint is .*checkpoint.pt"),
])
def test_non_finite_loss_stops_with_the_last_good_checkpoint(tmp_path, tiny_run_layer, monkeypatch, cadence, message):
    from mage_bench.mage import objective as objective_module

    calls = {"n": 0}
    original = objective_module.mage_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(objective_module, "mage_loss", poisoned)
    layer = {**tiny_run_layer, "train": {**tiny_run_layer["train"], **cadence}}
    with pytest.raises(TrainingFailed, match=message):
        train(_config(layer), tmp_path / "run", progress=False)
    assert safe_torch_load(tmp_path / "run" / "checkpoint.pt")["step"] == 3


@pytest.mark.parametrize("change, message", [
    ({"model": {"num_tokens": 16}}, r"expects 16 tokens from 32 codes, but tokenizer .* gives 64 from 32"),
    ({"data": {"image_size": 32}}, r"data.image_size=32 but tokenizer .* is built for 16 px"),
    ({"masking": {"spec": "cosine", "mask_ratio_min": 0.5}}, r"can draw ratios down to 0.0"),
    ({"train": {"augment": "dataset"}}, r"dataset needs a folder data set"),
    ({"contrastive": {"weight": 0.1}, "train": {"augment": "none"}}, r"needs two different views"),
    ({"train": {"amp": "bf16"}}, r"needs a GPU"),
])
def test_bad_run_configs(tmp_path, tiny_run_layer, change, message):
    layer = {k: ({**tiny_run_layer.get(k, {}), **v} if isinstance(v, dict) else v) for k, v in change.items()}
    with pytest.raises(ConfigError, match=message):
        train(_config({**tiny_run_layer, **layer}), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_missing_tokenizer_says_how_to_make_one(tmp_path, tiny_run_layer):
    with pytest.raises(UserError, match=r"tokenizer .*nope not found .*mage-bench tokenizer train"):
        train(_config({**tiny_run_layer, "tokenizer": str(tmp_path / "nope")}), tmp_path / "run", progress=False)


def test_training_on_an_image_folder(tmp_path, tiny_run_layer):
    from conftest import write_image_folder

    write_image_folder(tmp_path / "data", {"train": 6, "val": 2}, shape=(20, 24, 3))
    layer = {**tiny_run_layer, "data": {"name": f"imagefolder:{tmp_path / 'data'}", "image_size": 16},
             "train": {**tiny_run_layer["train"], "batch_size": 4, "steps": 5}}
    summary = train(_config(layer, contrastive={"weight": 0.2}), tmp_path / "run", progress=False)
    assert summary["finished"]
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["train"]["augment"] == "dataset"  # RandomResizedCrop + flip per view
    state = safe_torch_load(tmp_path / "run" / "checkpoint.pt")
    assert state["data"] == {**state["data"], "epoch": 1, "position": 2}  # 3 batches per epoch of 12 images
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss_contrastive"])) for r in log)


def test_cli_training_survives_kill_9(tmp_path, tiny_run_layer):
    """SIGKILL mid-run, then `--resume`: the same weights and log as an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    layer = {**tiny_run_layer, "train": {**tiny_run_layer["train"], "steps": 300, "checkpoint_every": 20}}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(layer))
    command = [sys.executable, "-m", "mage_bench.cli", "train", "--config", str(config), "--quiet"]
    victim = subprocess.Popen(command + ["--out", str(tmp_path / "killed")], cwd=tmp_path)
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # let it run past the checkpoint, so the log holds lines to rewind
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert safe_torch_load(checkpoint)["step"] < 300, "training finished before it could be killed"
    subprocess.run(command + ["--out", str(tmp_path / "killed"), "--resume"], check=True, cwd=tmp_path)
    subprocess.run(command + ["--out", str(tmp_path / "straight")], check=True, cwd=tmp_path)
    a, b = _weights(tmp_path / "killed"), _weights(tmp_path / "straight")
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda run: [{k: v for k, v in json.loads(x).items() if k != "time_s"}  # noqa: E731
                         for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert strip(tmp_path / "killed") == strip(tmp_path / "straight")


@pytest.mark.smoke  # inductor's first compilation: ~45 s on 2 cores
def test_a_compiled_run_trains_as_eager_up_to_rounding(tmp_path, tiny_run_layer):
    """train.compile: the objective through torch.compile (inductor on the CPU here). The losses follow the eager
    run's to float rounding, the checkpoint holds the plain module's keys, and the setting is recorded."""
    layer = {**tiny_run_layer, "train": {**tiny_run_layer["train"], "steps": 3, "checkpoint_every": 3}}
    train(_config(layer), tmp_path / "eager", progress=False)
    train(_config({**layer, "train": {**layer["train"], "compile": True}}), tmp_path / "compiled", progress=False)
    logs = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("eager", "compiled")]
    assert logs[0] == pytest.approx(logs[1], rel=1e-4)
    assert set(_weights(tmp_path / "compiled")) == set(_weights(tmp_path / "eager"))
    assert yaml.safe_load((tmp_path / "compiled" / "config.yaml").read_text())["train"]["compile"] is True
