import json
from pathlib import Path

import pytest
import torch

from mage_bench.config import MODEL_PRESETS
from mage_bench.errors import ConfigError
from mage_bench.mage import create_model
from mage_bench.mage.masking import sample_token_masks
from mage_bench.mage.model import MAGE, mage_loss
from mage_bench.train import param_groups

OFFICIAL_KEYS = Path(__file__).parent / "data" / "mage_vit_base_patch16_keys.json"


@pytest.fixture
def model(tiny_model_overrides):
    torch.manual_seed(0)
    return create_model("mage_tiny", **tiny_model_overrides).eval()


def _masks(n, L, ratio, minimum=0.5, seed=0):
    return sample_token_masks(torch.full((n,), ratio), L, minimum, torch.Generator().manual_seed(seed))


def test_official_base_layout_matches_the_reference_list():
    reference = json.loads(OFFICIAL_KEYS.read_text())["keys"]
    with torch.device("meta"):
        ours = create_model("mage_vit_base_patch16").state_dict()
    assert {k: list(v.shape) for k, v in ours.items()} == reference


def test_official_large_has_the_same_keys_at_its_width():
    reference = json.loads(OFFICIAL_KEYS.read_text())["keys"]
    with torch.device("meta"):
        large = create_model("mage_vit_large_patch16").state_dict()
    base_names = {k for k in reference if not k.startswith(("blocks.", "decoder_blocks."))}
    assert base_names <= set(large) and sum(k.endswith("attn.qkv.weight") for k in large) == 24 + 8
    assert tuple(large["token_emb.word_embeddings.weight"].shape) == (2025, 1024)


@pytest.mark.parametrize("name", MODEL_PRESETS.names())
def test_every_preset_builds_and_runs(name):
    with torch.device("meta"):
        m = create_model(name)
    assert isinstance(m, MAGE)
    if not m.config.legacy_params:
        small = create_model(name, depth=1, decoder_depth=1)
        L = small.config.num_tokens
        tokens = torch.randint(0, small.codebook_size, (2, L))
        mask, drop = _masks(2, L, 0.7)
        assert small(tokens, mask, drop).shape == (2, L + 1, small.config.vocab_size)


def test_logits_shape_and_special_ids(model):
    L = model.config.num_tokens
    tokens = torch.randint(0, 32, (3, L))
    mask, drop = _masks(3, L, 0.7)
    assert model(tokens, mask, drop).shape == (3, L + 1, 32 + 1 + 1)
    assert model.fake_class_label == 32 and model.mask_token_label == 33
    with torch.device("meta"):
        official = create_model("mage_vit_base_patch16")
    assert (official.fake_class_label, official.mask_token_label) == (1100, 2024)


def test_encoder_length_is_constant_across_ratios(model):
    L = model.config.num_tokens
    tokens = torch.randint(0, 32, (4, L))
    lengths = set()
    for ratio in (0.5, 0.6, 0.8, 1.0):
        mask, drop = _masks(4, L, ratio)
        latent, kept = model.forward_encoder(model.embed_tokens(tokens, mask), drop)
        lengths.add(latent.shape[1])
        assert (kept[:, 0] == 0).all()  # the class token always stays
    assert lengths == {1 + L - L // 2}


def test_loss_counts_exactly_the_masked_positions(model):
    L = model.config.num_tokens
    tokens = torch.randint(0, 32, (4, L))
    mask, drop = _masks(4, L, 0.7)
    logits = model(tokens, mask, drop)
    loss = mage_loss(logits, tokens, mask, 32, label_smoothing=0.0)
    manual = torch.nn.functional.cross_entropy(logits[:, 1:, :32][mask], tokens[mask])
    assert torch.allclose(loss, manual, atol=1e-6)
    changed = logits.clone()
    changed[:, 1:][~mask] += torch.randn_like(changed[:, 1:][~mask])  # unmasked positions do not count
    changed[:, 0] += 5.0  # nor does the class token, nor logits beyond the codebook
    changed[..., 32:] += 5.0
    assert torch.equal(mage_loss(changed, tokens, mask, 32), mage_loss(logits, tokens, mask, 32))


def test_label_smoothing_matches_the_official_formula(model):
    logits = torch.randn(2, 5, 40)
    tokens = torch.randint(0, 32, (2, 4))
    mask = torch.ones(2, 4, dtype=torch.bool)
    logp = torch.log_softmax(logits[:, 1:, :32], -1)
    expected = (0.9 * -logp.gather(-1, tokens[..., None]).squeeze(-1) + 0.1 * -logp.mean(-1)).mean()
    assert torch.allclose(mage_loss(logits, tokens, mask, 32, 0.1), expected, atol=1e-6)


def test_bad_masks_are_refused(model):
    L = model.config.num_tokens
    tokens = torch.randint(0, 32, (2, L))
    mask, drop = _masks(2, L, 0.7)
    with pytest.raises(ValueError, match="subset of mask"):
        model(tokens, torch.zeros_like(mask), drop)
    uneven = drop.clone()
    uneven[0, (~drop[0]).nonzero()[0]] = True
    with pytest.raises(ValueError, match="same number of tokens"):
        model(tokens, mask | uneven, uneven)
    with pytest.raises(ValueError, match="expected 64 tokens"):
        model(tokens[:, :10], mask[:, :10], drop[:, :10])


def test_features_are_batch_size_invariant_and_normalised(model):
    tokens = torch.randint(0, 32, (6, model.config.num_tokens))
    with torch.no_grad():
        whole = model.features(tokens)
        one_by_one = torch.cat([model.features(tokens[i:i + 1]) for i in range(6)])
    assert whole.shape == (6, 32)
    assert (whole - one_by_one).abs().max() < 1e-5
    assert torch.allclose(whole.mean(1), torch.zeros(6), atol=1e-5)


def test_word_embeddings_get_no_gradient_through_the_head(model):
    model.train()
    L = model.config.num_tokens
    tokens = torch.randint(0, 32, (2, L))
    mask = torch.ones(2, L, dtype=torch.bool)
    drop = torch.zeros_like(mask)
    mage_loss(model(tokens, mask, drop), tokens, mask, 32).backward()
    # Every input is [MASK] or the class token: only those rows can get a gradient, via the input.
    rows = model.token_emb.word_embeddings.weight.grad.abs().sum(1)
    assert set(rows.nonzero().flatten().tolist()) <= {model.fake_class_label, model.mask_token_label}


def test_weight_decay_groups_follow_the_official_rule():
    with torch.device("meta"):
        m = create_model("mage_vit_base_patch16")
    no_decay, decay = param_groups(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} >= {"mlm_layer.bias", "norm.weight", "blocks.0.attn.qkv.bias"}
    assert "token_emb.word_embeddings.weight" in {names[id(p)] for p in decay["params"]}
    legacy = {"patch_embed.proj.weight", "cls_token", "pos_embed", "mask_token", "decoder_pos_embed", "decoder_pred.weight"}
    assert not legacy & {names[id(p)] for p in no_decay["params"] + decay["params"]}


def test_unknown_override_is_a_config_error():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.embed_dims' \(did you mean 'embed_dim'"):
        create_model("mage_tiny", embed_dims=3)
