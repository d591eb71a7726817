import argparse

import pytest
import torch

from mage_bench.cli import main
from mage_bench.errors import CheckpointError
from mage_bench.import_mage import import_official_mage
from mage_bench.io import safe_torch_load
from mage_bench.mage import create_model
from mage_bench.mage.masking import sample_token_masks
from mage_bench.runs import load_run
from mage_bench.tokenizer import create_tokenizer


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    """A ViT-B checkpoint in the official layout ({'model': ...} with vqgan.* and an argparse args)."""
    torch.manual_seed(0)
    model = create_model("mage_vit_base_patch16")
    state = {f"vqgan.{k}": v for k, v in create_tokenizer("vqgan_mage").state_dict().items()}
    state.update(model.state_dict())
    path = tmp_path_factory.mktemp("official") / "mage-vitb.pth"
    torch.save({"model": state, "args": argparse.Namespace(model="mage_vit_base_patch16", blr=1.5e-4)}, path)
    return path, model.eval()


def test_official_checkpoint_imports_strictly_and_gives_the_same_logits(tmp_path, official_file):
    path, original = official_file
    card = import_official_mage(str(path), str(tmp_path / "mage-vitb"))
    assert card["architecture"] == "mage_vit_base_patch16" and card["source"]["args"]["blr"] == 1.5e-4
    run = load_run(tmp_path / "mage-vitb")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1024, (2, 256), generator=g)
    mask, drop = sample_token_masks(torch.full((2,), 0.75), 256, 0.5, g)
    with torch.no_grad():
        assert torch.equal(run.model(tokens, mask, drop), original(tokens, mask, drop))
    assert run.tokenizer.encode(torch.rand(1, 3, 256, 256)).shape == (1, 16, 16)


def test_mismatched_checkpoint_lists_the_keys(tmp_path, official_file):
    path, _ = official_file
    state = safe_torch_load(path)["model"]  # weights_only, argparse args allowed
    del state["blocks.3.mlp.fc1.weight"]
    state["decoder_norm.weight"] = torch.zeros(5)
    bad = tmp_path / "bad.pth"
    torch.save({"model": state}, bad)
    with pytest.raises(CheckpointError, match=r"missing keys: blocks.3.mlp.fc1.weight.*wrong shapes: decoder_norm.weight"):
        import_official_mage(str(bad), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_cli_import_mage_errors(tmp_path, capsys):
    path = tmp_path / "not-mage.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}}, path)
    assert main(["import", str(path), "--kind", "mage", "--out", str(tmp_path / "m")]) == 2
    assert "not an official MAGE checkpoint" in capsys.readouterr().err
