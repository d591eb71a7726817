"""MAGE: model presets by name (`create_model`), masking distributions, MAGE-C, decoding.

`create_model(name, **overrides)` builds a registered preset (`mage.presets.MODEL_PRESETS`):
`mage_vit_base_patch16`, `mage_vit_large_patch16` (official sizes and key names), `mage_tiny`
(the digits default) and `mage_small`.
"""

from __future__ import annotations

from typing import Any

from mage_bench.mage.presets import ModelConfig
from mage_bench.schema import from_dict


def model_config(name: str, **overrides: Any) -> ModelConfig:
    return from_dict(ModelConfig, {"name": name, **overrides}, "model")


def create_model(name: str, **overrides: Any):
    """A freshly initialised MAGE of preset `name`, with overrides by official argument names."""
    from mage_bench.mage.model import MAGE

    return MAGE(model_config(name, **overrides))
