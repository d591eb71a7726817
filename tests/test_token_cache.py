"""Cached tokens for folder data (`data.cache_tokens`): what is cached, that it is reused, that training on it
is exact across a resume, what the config records, and the settings it refuses."""

import json

import pytest
import torch
import yaml

from mage_bench import token_cache
from mage_bench.config import RunConfig, resolve_config
from mage_bench.errors import ConfigError
from mage_bench.io import safe_torch_load
from mage_bench.results import config_hash
from mage_bench.train import train


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(token_cache, "cache_root", lambda: tmp_path / "cache" / "tokens")


@pytest.fixture
def folder_layer(tmp_path, tiny_run_layer):
    from conftest import write_image_folder

    write_image_folder(tmp_path / "data", {"train": 7, "val": 2}, shape=(20, 24, 3))  # 14 train images
    return {**tiny_run_layer, "data": {"name": f"imagefolder:{tmp_path / 'data'}", "image_size": 16,
                                       "cache_tokens": True},
            "train": {**tiny_run_layer["train"], "batch_size": 4, "steps": 8, "checkpoint_every": 4}}


def _config(layer):
    return resolve_config(RunConfig, layer)


def test_the_cache_holds_each_images_centre_crop_and_its_flip(tmp_path, folder_layer, monkeypatch):
    monkeypatch.setattr(token_cache, "CHUNK_IMAGES", 5)  # 14 images: chunks of 5, 5 and 4
    train(_config(folder_layer), tmp_path / "run", progress=False)
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["data"]["cache_tokens"] is True and resolved["train"]["augment"] == "center-flip"
    launch = json.loads((tmp_path / "run" / "launch.json").read_text())
    cache = launch["token_cache"]
    assert cache["images"] == 14 and cache["chunks"] == 3 and cache["built_chunks"] == 3
    assert cache["views"] == ["center-crop", "center-crop-hflip"] and cache["encode"] == "fp32"
    assert cache["tokenizer"].startswith("sha256:")
    folder = tmp_path / "cache" / "tokens"
    (built,) = folder.iterdir()
    assert sorted(p.name for p in built.iterdir()) == ["cache.json", *(f"chunk-{c:06d}.pt" for c in range(3))]

    from mage_bench.data import create_dataset
    from mage_bench.tokenizer import load_tokenizer

    dataset = create_dataset(_config(folder_layer).data, "train", train_transform=False)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    vq = load_tokenizer(folder_layer["tokenizer"]).eval()
    with torch.no_grad():
        expected = torch.stack([vq.encode(images).flatten(1), vq.encode(images.flip(-1)).flatten(1)], dim=1)
    cached = torch.cat([safe_torch_load(built / f"chunk-{c:06d}.pt")["tokens"] for c in range(3)])
    assert cached.dtype == torch.int16
    agree = (cached.long() == expected).float().mean().item()
    assert agree > 0.99, agree  # batched with the flips: the encoder's float sums may differ in the last bit


def test_a_second_run_reuses_the_cache_and_training_draws_both_views(tmp_path, folder_layer, monkeypatch):
    train(_config(folder_layer), tmp_path / "first", progress=False)
    calls = []
    original = token_cache._tokenize_range
    monkeypatch.setattr(token_cache, "_tokenize_range", lambda *a, **k: calls.append(1) or original(*a, **k))
    layer = {**folder_layer, "seed": 1}
    train(_config(layer), tmp_path / "second", progress=False)
    assert calls == []  # nothing tokenised again
    assert json.loads((tmp_path / "second" / "launch.json").read_text())["token_cache"]["built_chunks"] == 0

    from mage_bench.train import Trainer, resolve_run_config, setup_runtime

    config = resolve_run_config(_config(folder_layer))
    stream = Trainer(config, setup_runtime(config)).stream
    seen = torch.cat([stream.next()[0] for _ in range(6)])  # 2 epochs of 3 batches of 4
    views = stream.view_tokens.long()
    matches = [(row == views[:, 0]).all(1).any() or (row == views[:, 1]).all(1).any() for row in seen]
    assert all(matches)  # every row is one of the cached views
    centre = sum(bool((row == views[:, 0]).all(1).any()) for row in seen)
    assert 0 < centre < len(seen)  # both views are drawn


def test_training_on_cached_tokens_resumes_exactly(tmp_path, folder_layer):
    train(_config(folder_layer), tmp_path / "straight", progress=False)
    train(_config(folder_layer), tmp_path / "resumed", progress=False, stop_at=4)
    train(_config(folder_layer), tmp_path / "resumed", resume=True, progress=False)
    a = safe_torch_load(tmp_path / "straight" / "checkpoint.pt")["model"]
    b = safe_torch_load(tmp_path / "resumed" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_new_keys_leave_old_config_hashes_alone(tiny_run_layer):
    """Runs made before data.cache_tokens and train.compile existed keep their hash while those hold the old
    meaning; setting either makes another run."""
    base = config_hash(_config(tiny_run_layer))
    stored = _config(tiny_run_layer)
    from mage_bench.config import run_identity, to_dict

    old_dict = to_dict(stored)
    del old_dict["data"]["cache_tokens"], old_dict["train"]["compile"]
    assert run_identity(to_dict(stored)) == run_identity(old_dict)
    assert config_hash(_config({**tiny_run_layer, "train": {**tiny_run_layer["train"], "compile": True}})) != base
    assert config_hash(stored.data) == config_hash(_config({**tiny_run_layer}).data)


@pytest.mark.parametrize("change, message", [
    ({"data": {"name": "digits", "image_size": 16, "cache_tokens": True}}, r"cache_tokens applies to folder data"),
    ({"train": {"augment": "dataset"}}, r"cache_tokens trains on the cached centre crop .* train.augment is dataset"),
    ({"data": {"cache_tokens": False}, "train": {"augment": "center-flip"}}, r"center-flip is the view set of cached"),
    ({"contrastive": {"weight": 0.1}}, r"needs two random views .* turn data.cache_tokens off"),
])
def test_settings_cached_tokens_cannot_honour_are_refused(tmp_path, folder_layer, change, message):
    layer = {k: ({**folder_layer.get(k, {}), **v} if isinstance(v, dict) else v) for k, v in change.items()}
    with pytest.raises(ConfigError, match=message):
        train(_config({**folder_layer, **layer}), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_the_sweep_guard_sees_what_cached_tokens_change(folder_layer):
    """A point with cached tokens differs from one without in data.cache_tokens and in its augmentation: swept
    alone, the augmentation is an undeclared difference; declared coupled, the sweep is allowed."""
    from types import SimpleNamespace

    from mage_bench.confounds import check_confounds

    cached = _config(folder_layer)
    fresh = _config({**folder_layer, "data": {**folder_layer["data"], "cache_tokens": False}})
    plans = [SimpleNamespace(point="cached", config=cached), SimpleNamespace(point="fresh", config=fresh)]
    with pytest.raises(ConfigError, match=r"points differ in data.cache_tokens besides the swept masking.spec"):
        check_confounds(SimpleNamespace(swept_keys=["masking.spec"], coupled=[]), plans)
    with pytest.raises(ConfigError, match=r"points differ in train.augment besides the swept data.cache_tokens: "
                                          r"'cached' has center-flip, 'fresh' has dataset"):
        check_confounds(SimpleNamespace(swept_keys=["data.cache_tokens"], coupled=[]), plans)
    coupled = [SimpleNamespace(key="train.augment", reason="cached tokens hold two fixed views")]
    differs = check_confounds(SimpleNamespace(swept_keys=["data.cache_tokens"], coupled=coupled), plans)
    assert differs["differing"] == ["data.cache_tokens", "train.augment"]
    assert [row["derived"]["augmentation"] for row in differs["table"]] == ["center-flip", "dataset"]


def test_the_tokenizer_trainer_refuses_cached_tokens(tmp_path, capsys):
    from mage_bench.cli import main

    config = tmp_path / "vq.yaml"
    config.write_text(yaml.safe_dump({"data": {"name": "digits", "image_size": 16, "cache_tokens": True}}))
    assert main(["tokenizer", "train", "--config", str(config), "--out", str(tmp_path / "vq")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.cache_tokens applies to MAGE training" in err
    assert not (tmp_path / "vq").exists()
