import json
from pathlib import Path

import pytest
import torch

from mage_bench.config import TOKENIZER_PRESETS
from mage_bench.tokenizer import create_tokenizer
from mage_bench.tokenizer.vqgan import VQGAN

OFFICIAL_KEYS = Path(__file__).parent / "data" / "vqgan_mage_keys.json"


@pytest.fixture
def tokenizer(tiny_tokenizer_overrides):
    torch.manual_seed(0)
    model = create_tokenizer("vq_digits", **tiny_tokenizer_overrides).eval()
    with torch.no_grad():  # spread the codes so that nearest-code ties are impossible in practice
        model.quantize.embedding.weight.normal_()
    return model


def test_round_trip_shapes_and_dtypes(tokenizer):
    images = torch.rand(5, 3, 16, 16)
    indices = tokenizer.encode(images)
    assert indices.shape == (5, 8, 8) and indices.dtype == torch.long
    assert int(indices.min()) >= 0 and int(indices.max()) < tokenizer.codebook_size
    recon = tokenizer.decode(indices)
    assert recon.shape == (5, 3, 16, 16) and recon.dtype == torch.float32
    assert float(recon.min()) >= 0.0 and float(recon.max()) <= 1.0


def test_indices_are_the_nearest_codes_by_brute_force(tokenizer):
    images = torch.rand(4, 3, 16, 16)
    indices = tokenizer.encode(images)
    with torch.no_grad():
        z = tokenizer._latent(images)  # [B, D, h, w]
    codes = tokenizer.quantize.embedding.weight
    vectors = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double()
    brute = ((vectors[:, None, :] - codes.double()[None, :, :]) ** 2).sum(-1).argmin(1)
    assert torch.equal(indices.flatten(), brute)


def test_decode_uses_the_codebook_entries(tokenizer):
    idx = torch.randint(0, tokenizer.codebook_size, (2, 8, 8))
    z_q = tokenizer.quantize.lookup(idx)
    assert torch.equal(z_q[1, :, 3, 5], tokenizer.quantize.embedding.weight[idx[1, 3, 5]])


def test_batch_size_does_not_change_tokens(tokenizer):
    images = torch.rand(6, 3, 16, 16)
    whole = tokenizer.encode(images)
    parts = torch.cat([tokenizer.encode(images[i:i + 1]) for i in range(6)])
    assert torch.equal(whole, parts)


def test_official_configuration_has_the_official_keys_and_shapes():
    reference = json.loads(OFFICIAL_KEYS.read_text())["keys"]
    with torch.device("meta"):
        model = create_tokenizer("vqgan_mage")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == reference
    assert model.config.token_grid == 16 and model.codebook_size == 1024


def test_projection_layers_appear_only_when_dims_differ():
    with torch.device("meta"):
        same = create_tokenizer("vq_digits", z_channels=16, embed_dim=16)
        other = create_tokenizer("vq_digits", z_channels=32, embed_dim=16)
    assert not any(k.startswith("quant_conv") for k in same.state_dict())
    assert "quant_conv.weight" in other.state_dict()


@pytest.mark.parametrize("name", TOKENIZER_PRESETS.names())
def test_every_preset_builds(name):
    with torch.device("meta"):
        model = create_tokenizer(name)
    assert isinstance(model, VQGAN)


def test_bad_inputs_are_clear(tokenizer):
    with pytest.raises(ValueError, match=r"expected images \[B, 3, H, W\]"):
        tokenizer.encode(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="divisible by the tokenizer stride 2"):
        tokenizer.encode(torch.rand(2, 3, 15, 15))
    with pytest.raises(ValueError, match="expected long indices"):
        tokenizer.decode(torch.zeros(2, 8, 8, dtype=torch.int32))
