import argparse
import json
import os

import pytest
import torch

from mage_bench.cli import main
from mage_bench.errors import CheckpointError
from mage_bench.io import safe_torch_load, sha256_file
from mage_bench.tokenizer import create_tokenizer, load_tokenizer
from mage_bench.tokenizer.checkpoint import import_official_vqgan


class RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _official_state_dict():
    torch.manual_seed(0)
    return create_tokenizer("vqgan_mage").state_dict()


def test_official_layout_loads_strictly_and_round_trips(tmp_path):
    state_dict = _official_state_dict()
    source = tmp_path / "vqgan_jax_strongaug.ckpt"
    torch.save({"state_dict": state_dict}, source)  # the official file's layout
    card = import_official_vqgan(str(source), str(tmp_path / "models" / "vqgan"))
    assert card["source"]["layout"] == "state_dict" and card["source"]["sha256"] == sha256_file(source)
    assert card["sha256"] == {"tokenizer": sha256_file(tmp_path / "models" / "vqgan" / "tokenizer.pt")}
    model = load_tokenizer(tmp_path / "models" / "vqgan")
    for key, value in model.state_dict().items():
        assert torch.equal(value, state_dict[key]), key
    indices = model.encode(torch.rand(1, 3, 256, 256))
    assert indices.shape == (1, 16, 16)


def test_mage_checkpoint_layout_and_argparse_args_are_accepted(tmp_path):
    small = create_tokenizer("vq_digits").state_dict()
    full = {f"vqgan.{k}": v for k, v in small.items()}
    full["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)  # MAGE's own weights are ignored
    source = tmp_path / "mage-vitb.pth"
    torch.save({"model": full, "args": argparse.Namespace(batch_size=64, model="mage_vit_base_patch16")}, source)
    card = import_official_vqgan(str(source), str(tmp_path / "out"), name="vq_digits")
    assert card["source"]["layout"] == "mage-model"


def _write(tmp_path, state_dict):
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": state_dict}, path)
    return str(path)


def test_missing_extra_and_misshaped_keys_are_all_listed(tmp_path):
    sd = dict(create_tokenizer("vq_digits").state_dict())
    del sd["encoder.conv_in.weight"]
    sd["encoder.extra.weight"] = torch.zeros(1)
    sd["quantize.embedding.weight"] = torch.zeros(7, 16)
    with pytest.raises(CheckpointError) as info:
        import_official_vqgan(_write(tmp_path, sd), str(tmp_path / "out"), name="vq_digits")
    message = str(info.value)
    assert "missing keys: encoder.conv_in.weight" in message
    assert "unexpected keys: encoder.extra.weight" in message
    assert "wrong shapes: quantize.embedding.weight (7, 16) != (128, 32)" in message
    assert "\n" not in message
    assert not (tmp_path / "out").exists()  # nothing half written


def test_checkpoint_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": RunsCodeWhenUnpickled(str(marker))}}, path)
    with pytest.raises(CheckpointError, match="refusing to load .*unsafe unpickling"):
        safe_torch_load(path)
    assert not marker.exists()


def test_cli_import_errors_exit_2_with_one_line(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save(RunsCodeWhenUnpickled(str(marker)), path)
    assert main(["import", str(path), "--kind", "vqgan", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mage-bench: error: refusing to load") and err.count("\n") == 1
    assert not marker.exists()
    assert main(["import", str(tmp_path / "missing.ckpt"), "--kind", "vqgan", "--out", str(tmp_path / "m")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_import_json(tmp_path, capsys):
    source = tmp_path / "vq.ckpt"
    torch.save(_official_state_dict(), source)  # a bare state_dict
    assert main(["import", str(source), "--kind", "vqgan", "--out", str(tmp_path / "m"), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["source"]["layout"] == "bare" and card["architecture"] == "vqgan_mage"


def test_not_a_tokenizer_file(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="is not a mage-bench tokenizer"):
        load_tokenizer(path)
