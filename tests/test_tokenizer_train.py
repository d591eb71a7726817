import json

import pytest
import torch

from mage_bench.cards import card_sha256
from mage_bench.config import TokenizerJobConfig, resolve_config
from mage_bench.data import create_dataset
from mage_bench.errors import UserError
from mage_bench.io import safe_torch_load, sha256_file
from mage_bench.tokenizer import load_tokenizer
from mage_bench.tokenizer.train import STATE_FILE, kmeans, train_tokenizer
from mage_bench.training import TrainingFailed


def _config(layer, **train):
    return resolve_config(TokenizerJobConfig, layer, {"train": train} if train else None)


def _recon_l1(model, images):
    return float((model.decode(model.encode(images)) - images).abs().mean())


def test_training_lowers_reconstruction_loss_and_writes_a_card(tmp_path, tiny_job_layer):
    cfg = _config(tiny_job_layer, steps=40)
    card = train_tokenizer(cfg, tmp_path / "vq", progress=False)
    test_images = create_dataset(cfg.data, "test").tensors()[0][:64]

    torch.manual_seed(cfg.seed)  # the same initialisation, untrained
    from mage_bench.tokenizer.vqgan import VQGAN
    untrained = VQGAN(cfg.tokenizer).eval()
    trained = load_tokenizer(tmp_path / "vq")
    assert _recon_l1(trained, test_images) < 0.6 * _recon_l1(untrained, test_images)

    log = [json.loads(line) for line in (tmp_path / "vq" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(2, 41, 2))
    assert log[-1]["l1"] < log[0]["l1"]

    m = card["metrics"]["test"]
    assert m["psnr_db"] > 10 and 0 < m["codebook_usage"] <= 1 and 1 <= m["perplexity"] <= 32
    assert m["codes_used"] == round(m["codebook_usage"] * 32)
    assert card_sha256(card, "tokenizer") == sha256_file(tmp_path / "vq" / "tokenizer.pt")
    assert card["files"] == {"tokenizer": "tokenizer.pt"}
    assert card["origin"] == "trained by mage-bench tokenizer train"
    assert card["token_grid"] == [8, 8] and card["steps"] == 40
    saved = json.loads((tmp_path / "vq" / "card.json").read_text())
    assert saved["metrics"] == card["metrics"]


def test_interrupt_and_resume_equals_an_uninterrupted_run(tmp_path, tiny_job_layer):
    cfg = _config(tiny_job_layer)  # 12 steps, checkpoints every 4, code restarts every 5
    train_tokenizer(cfg, tmp_path / "straight", progress=False)
    assert train_tokenizer(cfg, tmp_path / "split", progress=False, stop_at=6) == {"interrupted_at": 6}
    train_tokenizer(cfg, tmp_path / "split", resume=True, progress=False)

    a = load_tokenizer(tmp_path / "straight").state_dict()
    b = load_tokenizer(tmp_path / "split").state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # no step logged twice


def test_resume_rewinds_to_the_last_checkpoint(tmp_path, tiny_job_layer):
    cfg = _config(tiny_job_layer)
    train_tokenizer(cfg, tmp_path / "run", progress=False, stop_at=6)
    # A crash after step 6 but before the next checkpoint: the state on disk says step 6.
    assert safe_torch_load(tmp_path / "run" / STATE_FILE)["step"] == 6
    card = train_tokenizer(cfg, tmp_path / "run", resume=True, progress=False)
    assert card["steps"] == 12


def test_existing_state_needs_resume_and_resume_needs_same_config(tmp_path, tiny_job_layer):
    cfg = _config(tiny_job_layer)
    train_tokenizer(cfg, tmp_path / "run", progress=False, stop_at=4)
    with pytest.raises(UserError, match="already holds a training state; pass --resume"):
        train_tokenizer(cfg, tmp_path / "run", progress=False)
    with pytest.raises(UserError, match="config differs .*sections: train"):
        train_tokenizer(_config(tiny_job_layer, lr=1e-4), tmp_path / "run", resume=True, progress=False)


def test_batch_larger_than_data_is_a_user_error(tmp_path, tiny_job_layer):
    with pytest.raises(UserError, match="fewer than train.batch_size=5000"):
        train_tokenizer(_config(tiny_job_layer, batch_size=5000), tmp_path / "run", progress=False)


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centres])
    found = kmeans(points, 3, torch.Generator().manual_seed(1), iters=20)
    assert torch.cdist(centres, found).min(1).values.max() < 0.2


def test_optional_gan_loss_trains(tmp_path, tiny_job_layer):
    cfg = _config(tiny_job_layer, steps=4, gan_weight=0.1)
    card = train_tokenizer(cfg, tmp_path / "gan", progress=False)
    assert card["config"]["train"]["gan_weight"] == 0.1


def test_resuming_a_finished_run_returns_its_card(tmp_path, tiny_job_layer):
    cfg = _config(tiny_job_layer, steps=4)
    first = train_tokenizer(cfg, tmp_path / "run", progress=False)
    again = train_tokenizer(cfg, tmp_path / "run", resume=True, progress=False)
    assert again == first
    with pytest.raises(UserError, match="trained with another config"):
        train_tokenizer(_config(tiny_job_layer, steps=5), tmp_path / "run", resume=True, progress=False)


def test_cli_survives_kill_9_and_resumes_to_the_same_weights(tmp_path, tiny_job_layer):
    """A real SIGKILL mid-training, then `--resume`: same weights as an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    layer = {**tiny_job_layer, "train": {**tiny_job_layer["train"], "steps": 120, "checkpoint_every": 20}}
    config = tmp_path / "tok.yaml"
    config.write_text(yaml.safe_dump(layer))
    command = [sys.executable, "-m", "mage_bench.cli", "tokenizer", "train", "--config", str(config), "--quiet"]
    killed = subprocess.Popen(command + ["--out", str(tmp_path / "killed")])
    state = tmp_path / "killed" / STATE_FILE
    deadline = time.monotonic() + 120
    while not state.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "card.json").exists(), "training finished before it could be killed"
    subprocess.run(command + ["--out", str(tmp_path / "killed"), "--resume"], check=True)
    subprocess.run(command + ["--out", str(tmp_path / "straight")], check=True)
    a = load_tokenizer(tmp_path / "killed").state_dict()
    b = load_tokenizer(tmp_path / "straight").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_out_that_is_a_file_is_a_user_error(tmp_path, tiny_job_layer):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file; give a folder"):
        train_tokenizer(_config(tiny_job_layer), tmp_path / "file", progress=False)


def test_non_finite_loss_stops_with_the_last_good_checkpoint(tmp_path, tiny_job_layer, monkeypatch):
    from mage_bench.tokenizer.train import TokenizerSteps, TrainingDiverged

    original = TokenizerSteps._losses

    def poisoned(self, x, *args):
        losses = original(self, x, *args)
        if self.stream.state() == {"epoch": 0, "batch": 7}:  # step 6 (the 7th batch)
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(TokenizerSteps, "_losses", poisoned)
    with pytest.raises(TrainingDiverged, match=r"non-finite tokenizer loss at step 6; the last good checkpoint is "
                                               r".*train_state.pt; lower train.lr"):
        train_tokenizer(_config(tiny_job_layer), tmp_path / "run", progress=False)
    assert issubclass(TrainingDiverged, TrainingFailed)  # the CLI and sweeps catch this one type
    assert safe_torch_load(tmp_path / "run" / STATE_FILE)["step"] == 4
