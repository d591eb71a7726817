"""MAGE model presets by name and the model's config section (kept beside the model they build).

The official sizes follow models_mage.py; the CPU presets are sized for the bundled digits tokenizers.
`mage_bench.config.RunConfig` holds a `ModelConfig` as its `model` section.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mage_bench.registry import Registry
from mage_bench.schema import require

# Model presets. The official sizes follow models_mage.py (mage_vit_base_patch16 /
# mage_vit_large_patch16: 256 tokens, 1024 codes, 1000 reserved class ids, fake class id 1100,
# the legacy unused parameters kept so official checkpoints load strictly).
MODEL_PRESETS: Registry[dict[str, Any]] = Registry("model")
_OFFICIAL = dict(num_tokens=256, codebook_size=1024, num_class_ids=1000, fake_class_offset=76,
                 mlp_ratio=4.0, dropout=0.1, legacy_params=True, img_size=256, patch_size=16)
MODEL_PRESETS.register("mage_vit_base_patch16")(
    dict(_OFFICIAL, embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=768, decoder_depth=8,
         decoder_num_heads=16))
MODEL_PRESETS.register("mage_vit_large_patch16")(
    dict(_OFFICIAL, embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=1024, decoder_depth=8,
         decoder_num_heads=16))
# CPU presets for the digits tokenizers. One class id is enough: the 1000 reserved ids of the
# official vocabulary are a legacy of its JAX checkpoint. Dropout is off: on CPU its random masks
# cost about 40% of a step (measured: mage_small 2.84 -> 1.81 s per step without it), and the heavy
# masking already regularises.
_DIGITS = dict(codebook_size=128, num_class_ids=1, fake_class_offset=0, mlp_ratio=4.0,
               dropout=0.0, legacy_params=False, img_size=16, patch_size=4)
# mage_tiny: the digits default, on vq_digits' 4x4 = 16 tokens.
MODEL_PRESETS.register("mage_tiny")(
    dict(_DIGITS, num_tokens=16, embed_dim=64, depth=4, num_heads=2, decoder_embed_dim=64, decoder_depth=2,
         decoder_num_heads=2))
# mage_small: wider and deeper, on vq_digits_8x8's 64 tokens (the finer grid a larger model can use).
MODEL_PRESETS.register("mage_small")(
    dict(_DIGITS, num_tokens=64, patch_size=2, embed_dim=192, depth=6, num_heads=6, decoder_embed_dim=192,
         decoder_depth=4, decoder_num_heads=6))


@dataclass(frozen=True)
class ModelConfig:
    """MAGE encoder/decoder. Names follow the official constructor where it has one."""

    name: str = "mage_tiny"  # preset the other fields start from
    num_tokens: int = 16  # L: tokens per image (token grid h*w of the tokenizer)
    codebook_size: int = 128  # tokenizer codes; logits beyond these are never trained
    num_class_ids: int = 1  # ids reserved after the codes (official 1000)
    fake_class_offset: int = 0  # class-token id = codebook_size + this (official 76 -> id 1100)
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 2
    decoder_embed_dim: int = 64
    decoder_depth: int = 2
    decoder_num_heads: int = 2
    mlp_ratio: float = 4.0
    dropout: float = 0.0  # embedding, attention, projection and MLP dropout (official 0.1)
    legacy_params: bool = False  # keep the official never-used parameters (strict loading)
    img_size: int = 16  # only sizes the legacy patch_embed / decoder_pred parameters
    patch_size: int = 4

    @classmethod
    def preset_defaults(cls, name: str) -> dict[str, Any]:
        return dict(MODEL_PRESETS.get(name), name=name)

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + self.num_class_ids + 1  # codes, class ids, [MASK]

    def validate(self, path: str) -> None:
        require(self.embed_dim % self.num_heads == 0, f"{path}.embed_dim must be divisible by num_heads")
        require(self.decoder_embed_dim % self.decoder_num_heads == 0,
                 f"{path}.decoder_embed_dim must be divisible by decoder_num_heads")
        require(0 <= self.fake_class_offset < self.num_class_ids,
                 f"{path}.fake_class_offset must be in [0, num_class_ids)")
        require(self.num_tokens >= 2 and self.depth >= 1 and self.decoder_depth >= 1,
                 f"{path}: num_tokens >= 2, depth >= 1 and decoder_depth >= 1 are required")
        require(0.0 <= self.dropout < 1.0, f"{path}.dropout must be in [0, 1)")
