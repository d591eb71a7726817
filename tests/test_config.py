import dataclasses

import pytest

from mage_bench.config import (
    TOKENIZER_PRESETS,
    DataConfig,
    TokenizerConfig,
    TokenizerJobConfig,
    cli_layer,
    dump_yaml,
    from_dict,
    load_yaml,
    resolve_config,
    to_dict,
)
from mage_bench.errors import ConfigError


def test_defaults_come_from_one_place():
    cfg = resolve_config(TokenizerJobConfig)
    assert cfg == TokenizerJobConfig()
    # The dataclass defaults of the tokenizer section are exactly the default preset.
    assert to_dict(cfg.tokenizer) == to_dict(from_dict(TokenizerConfig, {"name": "vq_digits"}))


def test_precedence_cli_over_file_over_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\ntrain: {steps: 40, batch_size: 8}\ndata: {image_size: 16}\n")
    cfg = resolve_config(TokenizerJobConfig, load_yaml(path), cli_layer(**{"train.steps": 7, "seed": None}))
    assert cfg.train.steps == 7  # CLI beats file
    assert cfg.train.batch_size == 8  # file beats default
    assert cfg.seed == 3  # None on the CLI means "not given"
    assert cfg.train.lr == TokenizerJobConfig().train.lr  # default where nobody spoke


def test_preset_named_in_a_lower_layer_is_expanded_after_merging(tmp_path):
    cfg = resolve_config(TokenizerJobConfig, {"tokenizer": {"name": "vqgan_mage"}, "data": {"image_size": 256}},
                         {"tokenizer": {"ch": 64}})
    official = TOKENIZER_PRESETS.get("vqgan_mage")
    assert cfg.tokenizer.ch == 64  # override applied on top of the preset
    assert cfg.tokenizer.ch_mult == official["ch_mult"] and cfg.tokenizer.n_embed == 1024


@pytest.mark.parametrize("layer, message", [
    ({"trian": {}}, r"unknown config key 'trian' \(did you mean 'train'\?\)"),
    ({"train": {"stpes": 3}}, r"unknown config key 'train.stpes' \(did you mean 'steps'\?\)"),
    ({"tokenizer": {"chmult": [1, 2]}}, r"unknown config key 'tokenizer.chmult' \(did you mean 'ch_mult'\?\)"),
    ({"train": {"steps": "ten"}}, r"train.steps must be an integer, not 'ten'"),
    ({"train": {"lr": True}}, r"train.lr must be a number"),
    ({"tokenizer": {"ch_mult": 2}}, r"tokenizer.ch_mult must be a list"),
    ({"tokenizer": {"name": "vqgam_mage"}}, r"tokenizer.name: unknown tokenizer 'vqgam_mage' \(did you mean 'vqgan_mage'\?\)"),
    ({"data": "digits"}, r"data must be a mapping"),
    ({"train": {"codebook_init": "random"}}, r"codebook_init must be 'kmeans' or 'uniform'"),
    ({"tokenizer": {"norm_groups": 5}}, r"norm_groups=5 must divide"),
])
def test_bad_keys_and_values_name_the_key_path(layer, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(TokenizerJobConfig, layer)


def test_configs_are_frozen():
    cfg = TokenizerJobConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]


def test_yaml_round_trip(tmp_path):
    cfg = resolve_config(TokenizerJobConfig, {"train": {"steps": 9}, "data": {"split_seed": 4}})
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    assert resolve_config(TokenizerJobConfig, load_yaml(path)) == cfg


def test_int_is_accepted_where_a_float_is_expected():
    assert from_dict(DataConfig, {"test_fraction": 0}).test_fraction == 0.0


@pytest.mark.parametrize("text, message", [
    ("train: [1, 2\n", "not valid YAML at line"),
    ("- 1\n- 2\n", "must hold a mapping at the top"),
])
def test_bad_yaml_files(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_yaml(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "nope.yaml")


def test_job_validation_catches_size_mismatch():
    with pytest.raises(ConfigError, match="data.image_size=32 differs from tokenizer.resolution=16"):
        resolve_config(TokenizerJobConfig, {"data": {"image_size": 32}})


def test_atomic_writes_follow_the_umask(tmp_path):
    import os

    from mage_bench.io import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
