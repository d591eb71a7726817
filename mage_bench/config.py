"""Typed, frozen configuration: the one place where defaults live.

Precedence is implemented once, in `resolve_config`: CLI > config file > dataclass defaults.
Layers are merged as plain dicts first and only then turned into dataclasses, so a file that says
`tokenizer: {name: vqgan_mage}` starts from that preset, not from the default preset's numbers.
Unknown keys are errors naming the full key path with a "did you mean".
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mage_bench.errors import ConfigError, UserError
from mage_bench.registry import Registry, did_you_mean

C = TypeVar("C")

# --------------------------------------------------------------------------------------------
# Sections


RESIZE_FILTERS = ("bilinear", "bicubic")
MASKING_PER = ("batch", "process", "sample")
PNG_QUANTISATION = ("truncate", "round")


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"  # registry spec: digits | imagefolder:PATH | cifar10:ROOT
    image_size: int = 16  # digits are 8x8 originally; 16 px gives an 8x8 token grid at stride 2
    test_fraction: float = 0.2  # digits only: held-out share of the stratified split
    split_seed: int = 0  # digits only: the split is fixed by this seed and recorded with the run
    download: bool = False  # cifar10 only: never download unless asked explicitly
    num_workers: int = 0  # DataLoader workers for folder data sets (in-memory sets ignore it)
    # Folder data sets only: the filter of the training crops and of the evaluation resize (which also
    # makes the FID reference images). bilinear is the official choice for both (torchvision's default
    # in the pre-training crops; PIL bilinear in prepare_imgnet_val.py); bicubic is what timm-style
    # pipelines use. Recorded in config.yaml, so it is part of every run's provenance.
    resize: str = "bilinear"

    def validate(self, path: str) -> None:
        _require(self.resize in RESIZE_FILTERS, f"{path}.resize must be one of {', '.join(RESIZE_FILTERS)}, "
                                                f"not {self.resize!r}")


# Presets of the VQGAN tokenizer. `vqgan_mage` is the official MAGE/MaskGIT configuration
# (config/vqgan.yaml in the official repository: its attn_resolutions entry is unused there).
TOKENIZER_PRESETS: Registry[dict[str, Any]] = Registry("tokenizer")
TOKENIZER_PRESETS.register("vqgan_mage")(
    dict(in_channels=3, resolution=256, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
         z_channels=256, n_embed=1024, embed_dim=256, norm_groups=32, dropout=0.0)
)
# Digits at 16 px -> 4x4 = 16 tokens (each token a 4x4-pixel stroke fragment). Chosen by measuring
# what MAGE learns from the tokens on 2 CPU cores (mage_tiny, linear probe on pooled features):
# with 8x8 tokens (2x2-pixel patches, nearly pixel values) 500 steps (2 min) did not beat the
# untrained model (0.40-0.45 vs 0.38-0.43 over 2 seeds); with 4x4 tokens 2000 steps (2.2 min) reached
# 0.88 vs 0.41 untrained, and samples look like digits. 4x4 reconstructs at 29 dB test PSNR with 99%
# of codes used; vq_digits_8x8 (41 dB) stays available for finer tokens.
TOKENIZER_PRESETS.register("vq_digits")(
    dict(in_channels=3, resolution=16, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1,
         z_channels=32, n_embed=128, embed_dim=32, norm_groups=8, dropout=0.0)
)
# ch 16 / 32-dim codes measured best per second at 8x8 (41.2 dB in 1000 steps, ~95 s); ch 32 was
# 3x slower per step and 16-dim projected codes reached 38.4 dB.
TOKENIZER_PRESETS.register("vq_digits_8x8")(
    dict(in_channels=3, resolution=16, ch=16, ch_mult=(1, 2), num_res_blocks=1,
         z_channels=32, n_embed=128, embed_dim=32, norm_groups=8, dropout=0.0)
)


@dataclass(frozen=True)
class TokenizerConfig:
    """VQGAN architecture. Field names follow the official constructor (`ddconfig`, `n_embed`, `embed_dim`)."""

    name: str = "vq_digits"  # preset the other fields start from
    in_channels: int = 3
    resolution: int = 16  # image side the tokenizer is built for
    ch: int = 16  # base channel count
    ch_mult: tuple[int, ...] = (1, 2, 2)  # one entry per resolution; len-1 average-pool downsamplings
    num_res_blocks: int = 1
    z_channels: int = 32  # encoder output channels
    n_embed: int = 128  # codebook size
    embed_dim: int = 32  # codebook vector size; != z_channels adds 1x1 projections (not in official)
    norm_groups: int = 8  # GroupNorm groups (official 32)
    dropout: float = 0.0

    @classmethod
    def preset_defaults(cls, name: str) -> dict[str, Any]:
        return dict(TOKENIZER_PRESETS.get(name), name=name)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def token_grid(self) -> int:
        return self.resolution // self.downsample

    def validate(self, path: str) -> None:
        _require(self.ch > 0 and self.num_res_blocks >= 1, f"{path}.ch/num_res_blocks must be positive")
        _require(len(self.ch_mult) >= 1 and all(m > 0 for m in self.ch_mult), f"{path}.ch_mult must be positive")
        for width in [self.ch * m for m in self.ch_mult]:
            _require(width % self.norm_groups == 0,
                     f"{path}.norm_groups={self.norm_groups} must divide every width ch*ch_mult ({width})")
        _require(self.resolution % self.downsample == 0,
                 f"{path}.resolution={self.resolution} must be divisible by 2**(len(ch_mult)-1)={self.downsample}")
        _require(self.n_embed >= 2 and self.embed_dim >= 1, f"{path}.n_embed/embed_dim too small")


@dataclass(frozen=True)
class TokenizerTrainConfig:
    steps: int = 1000  # ~95 s for vq_digits on 2 cores
    batch_size: int = 64
    lr: float = 2e-3  # Adam; small conv nets on digits tolerate a high rate after warmup
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05  # cosine decays to lr * this
    grad_clip: float = 1.0
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    commitment_beta: float = 0.25  # official VQGAN beta
    codebook_init: str = "kmeans"  # kmeans | uniform (official init, collapses easily on small data)
    dead_code_every: int = 50  # steps between restarts of codes unused in that window; 0 = off
    gan_weight: float = 0.0  # patch-GAN adversarial loss weight; off by default on CPU
    gan_start_step: int = 0
    disc_lr: float = 2e-4
    hflip: bool = False  # horizontal-flip augmentation (wrong for digits, right for natural images)
    checkpoint_every: int = 200
    log_every: int = 25
    eval_images: int = 512  # test images used for the card's reconstruction metrics

    def validate(self, path: str) -> None:
        _require(self.steps >= 1, f"{path}.steps must be >= 1")
        _require(self.batch_size >= 2, f"{path}.batch_size must be >= 2")
        _require(self.lr > 0, f"{path}.lr must be > 0")
        _require(self.codebook_init in ("kmeans", "uniform"),
                 f"{path}.codebook_init must be 'kmeans' or 'uniform', not {self.codebook_init!r}")
        _require(self.checkpoint_every >= 1 and self.log_every >= 1, f"{path}.checkpoint_every/log_every must be >= 1")
        _require(self.gan_weight >= 0, f"{path}.gan_weight must be >= 0")


@dataclass(frozen=True)
class TokenizerJobConfig:
    """Everything `mage-bench tokenizer train` needs; written in full to the output folder."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)

    def validate(self, path: str = "") -> None:
        _require(self.data.image_size == self.tokenizer.resolution,
                 f"data.image_size={self.data.image_size} differs from tokenizer.resolution="
                 f"{self.tokenizer.resolution}; set one to match the other")


# --------------------------------------------------------------------------------------------
# Machinery


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Check `value` against the type hint, converting only lossless cases (int -> float, list -> tuple)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path} must be a mapping of {hint.__name__} keys, not {type(value).__name__}")
        return from_dict(hint, value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, not {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{path} must have {len(args)} entries, not {len(value)}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path} must be a mapping, not {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path} must be true or false, not {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path} must be an integer, not {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{path} must be a number, not {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path} must be a string, not {value!r}")
    return value


def from_dict(cls: type[C], data: Mapping[str, Any] | None, path: str = "") -> C:
    """Build dataclass `cls` from a (possibly partial) mapping, rejecting unknown keys.

    A class with `preset_defaults(name)` starts from the named preset's values.
    """
    data = dict(data or {})
    if hasattr(cls, "migrate"):  # keys renamed since older run folders were written
        data = cls.migrate(data)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            where = _join(path, str(key))
            raise ConfigError(f"unknown config key {where!r}{did_you_mean(str(key), names)}")
    if hasattr(cls, "preset_defaults") and "name" in data:
        if not isinstance(data["name"], str):
            raise ConfigError(f"{_join(path, 'name')} must be a string, not {data['name']!r}")
        try:
            preset = cls.preset_defaults(data["name"])
        except ConfigError:
            raise
        except Exception as exc:  # registry miss: say which key held the bad name
            raise ConfigError(f"{_join(path, 'name')}: {exc}") from None
        data = {**preset, **data}
    hints = typing.get_type_hints(cls)
    kwargs = {key: _coerce(value, hints[key], _join(path, key)) for key, value in data.items()}
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(path or cls.__name__)
    return obj


def to_dict(obj: Any) -> Any:
    """A plain, YAML/JSON-safe dict (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively overlay `override` on `base` (mappings merge; everything else is replaced)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def resolve_config(cls: type[C], file_layer: Mapping[str, Any] | None = None,
                   cli_layer: Mapping[str, Any] | None = None) -> C:
    """The one implementation of precedence: CLI > config file > dataclass defaults."""
    return from_dict(cls, deep_merge(dict(file_layer or {}), dict(cli_layer or {})))


def require_same_config(stored: Mapping[str, Any], current: Any, where: str) -> None:
    """Resuming needs the config the run started with; name the sections that changed."""
    now = to_dict(current)
    if dict(stored) != now:
        changed = [k for k in sorted(set(stored) | set(now)) if stored.get(k) != now.get(k)]
        raise UserError(f"the config differs from the one {where} was trained with (sections: "
                        f"{', '.join(changed)}); resume with the same config or choose another --out")


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top, not {type(data).__name__}")
    return data


def dump_yaml(obj: Any) -> str:
    import yaml

    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def cli_layer(**dotted: Any) -> dict[str, Any]:
    """{'train.steps': 5, 'seed': None} -> {'train': {'steps': 5}}; None means 'not given on the CLI'."""
    layer: dict[str, Any] = {}
    for key, value in dotted.items():
        if value is None:
            continue
        node = layer
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return layer


# --------------------------------------------------------------------------------------------
# MAGE runs (`mage-bench train`)

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
        _require(self.embed_dim % self.num_heads == 0, f"{path}.embed_dim must be divisible by num_heads")
        _require(self.decoder_embed_dim % self.decoder_num_heads == 0,
                 f"{path}.decoder_embed_dim must be divisible by decoder_num_heads")
        _require(0 <= self.fake_class_offset < self.num_class_ids,
                 f"{path}.fake_class_offset must be in [0, num_class_ids)")
        _require(self.num_tokens >= 2 and self.depth >= 1 and self.decoder_depth >= 1,
                 f"{path}: num_tokens >= 2, depth >= 1 and decoder_depth >= 1 are required")
        _require(0.0 <= self.dropout < 1.0, f"{path}.dropout must be in [0, 1)")


@dataclass(frozen=True)
class MaskingConfig:
    spec: str = "truncnorm:mean=0.55,std=0.25,min=0.5,max=1.0"  # the official distribution
    # Share of tokens always dropped from the encoder. None: the distribution's lower bound, which
    # is what the official code does (its truncation minimum is also its drop share).
    mask_ratio_min: float | None = None
    # Who shares one drawn ratio: "process" (official: each training process draws its own ratio per
    # step, numpy seeded with seed + rank, so the paper's 4096-image step has 64 ratios), "batch" (one
    # ratio for the whole global batch) or "sample" (one per image). With one process, "process" and
    # "batch" are the same draws.
    per: str = "process"
    # A drop share above the distribution's lower bound is refused (dropped tokens must be masked),
    # unless this is set: then draws below the drop share are raised to it, which changes the realised
    # distribution (sweeps show each point's realised mean ratio beside its drop share).
    clamp_to_drop: bool = False

    @classmethod
    def migrate(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Configs written before `per` existed said `per_sample: true|false`."""
        if "per_sample" in data and "per" not in data:
            data = dict(data)
            data["per"] = "sample" if data.pop("per_sample") else "batch"
        return data

    def validate(self, path: str) -> None:
        _require(self.per in MASKING_PER, f"{path}.per must be one of {', '.join(MASKING_PER)}, not {self.per!r}")


@dataclass(frozen=True)
class ContrastiveConfig:
    """MAGE-C. The official repository never released it; see mage_bench/mage/contrastive.py."""

    weight: float = 0.0  # 0 = plain MAGE: no second view is computed
    temperature: float = 0.2
    proj_hidden_dim: int | None = None  # None: the encoder width
    proj_dim: int = 128

    def validate(self, path: str) -> None:
        _require(self.weight >= 0, f"{path}.weight must be >= 0")
        _require(self.temperature > 0, f"{path}.temperature must be > 0")


@dataclass(frozen=True)
class TrainConfig:
    # Defaults are the CPU digits recipe of mage_tiny (under 2 minutes on 2 cores). The official
    # ImageNet recipe differs in budget and rate: blr 1.5e-4, batch 4096, 1600 epochs, 40 warmup.
    steps: int = 1500  # optimizer steps (a budget in steps, not time, keeps runs comparable)
    batch_size: int = 128  # per process; the effective batch multiplies by the world size
    blr: float = 3e-3  # base lr; lr = blr * effective batch / 256 (1.5e-3 here; a higher rate lowered
    #                    the loss faster but gave worse probe features on digits, measured)
    warmup_steps: int = 75
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 3.0
    label_smoothing: float = 0.1
    augment: str = "auto"  # auto | none | affine | dataset; auto: affine for MAGE-C on in-memory data
    amp: str = "auto"  # auto (bf16 on capable GPUs, off on CPU) | off | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda
    checkpoint_every: int = 200
    log_every: int = 10

    def validate(self, path: str) -> None:
        _require(self.steps >= 1 and self.batch_size >= 2, f"{path}: steps >= 1 and batch_size >= 2 are required")
        _require(self.blr > 0 and self.weight_decay >= 0, f"{path}: blr > 0 and weight_decay >= 0 are required")
        _require(self.augment in ("auto", "none", "affine", "dataset"),
                 f"{path}.augment must be auto, none, affine or dataset, not {self.augment!r}")
        _require(self.amp in ("auto", "off", "bf16", "fp16"), f"{path}.amp must be auto, off, bf16 or fp16")
        _require(self.device in ("auto", "cpu", "cuda"), f"{path}.device must be auto, cpu or cuda")
        _require(0 <= self.label_smoothing < 1, f"{path}.label_smoothing must be in [0, 1)")
        _require(self.checkpoint_every >= 1 and self.log_every >= 1, f"{path}: checkpoint_every/log_every >= 1")


@dataclass(frozen=True)
class GenerateConfig:
    """Iterative decoding defaults of a run (official script: 12 steps, temperature 4.5)."""

    steps: int = 12
    temperature: float = 4.5
    # How decoded [0, 1] pixels become 8-bit PNG values: "truncate" as the official code
    # (`astype(uint8)` of x * 255) or "round" (half a grey level brighter on average).
    png: str = "truncate"

    def validate(self, path: str) -> None:
        _require(self.png in PNG_QUANTISATION, f"{path}.png must be truncate or round, not {self.png!r}")
        _require(self.steps >= 1, f"{path}.steps must be >= 1")
        _require(self.temperature >= 0, f"{path}.temperature must be >= 0")


@dataclass(frozen=True)
class RunConfig:
    """Everything `mage-bench train` needs; written, resolved, to RUN_DIR/config.yaml."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: str = "models/vq-digits"  # a folder made by `tokenizer train` or `import`
    model: ModelConfig = field(default_factory=ModelConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    # Cross-section checks that need the masking registry or the tokenizer live in
    # mage_bench.train.resolve_run_config (config never imports model code).
