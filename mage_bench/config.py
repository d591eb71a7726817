"""Typed, frozen configuration sections of runs and tokenizer jobs: the one place where their defaults live.

The machinery (from_dict, to_dict, precedence CLI > file > defaults, YAML) is `mage_bench.schema`,
re-exported here; the model's section and presets live beside the model (`mage_bench.mage.presets`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from mage_bench.errors import ConfigError, UserError
from mage_bench.mage.presets import MODEL_PRESETS, ModelConfig
from mage_bench.registry import Registry
from mage_bench.schema import (  # noqa: F401  (re-exported: the names every caller imports from here)
    cli_layer,
    deep_merge,
    dump_yaml,
    from_dict,
    load_yaml,
    require,
    require_same_config,
    resolve_config,
    to_dict,
)

__all__ = ["MODEL_PRESETS", "ModelConfig", "cli_layer", "deep_merge", "dump_yaml", "from_dict", "load_yaml",
           "require_same_config", "resolve_config", "to_dict"]

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
    # Folder data sets only: tokenise each training image once per fixed view, the centre crop and its
    # horizontal flip (MAR's cached-latent training), instead of running the VQGAN on a random crop every step.
    # Training then sees those two views only: `train.augment` resolves to center-flip, which the sweep's
    # confound checks compare like any other setting. The tokens are kept under $MAGE_BENCH_CACHE/tokens.
    cache_tokens: bool = False

    def validate(self, path: str) -> None:
        require(self.resize in RESIZE_FILTERS, f"{path}.resize must be one of {', '.join(RESIZE_FILTERS)}, "
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
        require(self.ch > 0 and self.num_res_blocks >= 1, f"{path}.ch/num_res_blocks must be positive")
        require(len(self.ch_mult) >= 1 and all(m > 0 for m in self.ch_mult), f"{path}.ch_mult must be positive")
        for width in [self.ch * m for m in self.ch_mult]:
            require(width % self.norm_groups == 0,
                     f"{path}.norm_groups={self.norm_groups} must divide every width ch*ch_mult ({width})")
        require(self.resolution % self.downsample == 0,
                 f"{path}.resolution={self.resolution} must be divisible by 2**(len(ch_mult)-1)={self.downsample}")
        require(self.n_embed >= 2 and self.embed_dim >= 1, f"{path}.n_embed/embed_dim too small")


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
        require(self.steps >= 1, f"{path}.steps must be >= 1")
        require(self.batch_size >= 2, f"{path}.batch_size must be >= 2")
        require(self.lr > 0, f"{path}.lr must be > 0")
        require(self.codebook_init in ("kmeans", "uniform"),
                 f"{path}.codebook_init must be 'kmeans' or 'uniform', not {self.codebook_init!r}")
        require(self.checkpoint_every >= 1 and self.log_every >= 1, f"{path}.checkpoint_every/log_every must be >= 1")
        require(self.gan_weight >= 0, f"{path}.gan_weight must be >= 0")


@dataclass(frozen=True)
class TokenizerJobConfig:
    """Everything `mage-bench tokenizer train` needs; written in full to the output folder."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)

    def validate(self, path: str = "") -> None:
        require(not self.data.cache_tokens, "data.cache_tokens applies to MAGE training (its token inputs); the "
                                            "tokenizer trains on pixels: remove it from the tokenizer's config")
        require(self.data.image_size == self.tokenizer.resolution,
                 f"data.image_size={self.data.image_size} differs from tokenizer.resolution="
                 f"{self.tokenizer.resolution}; set one to match the other")



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
        require(self.per in MASKING_PER, f"{path}.per must be one of {', '.join(MASKING_PER)}, not {self.per!r}")

    @functools.cached_property
    def distribution(self) -> Any:
        """The `MaskingDistribution` of `spec`, built once per config object (training, the confound
        guard and the report's densities all read this one instead of parsing the string again)."""
        from mage_bench.mage.masking import create_masking

        return create_masking(self.spec)


@dataclass(frozen=True)
class ContrastiveConfig:
    """MAGE-C. The official repository never released it; see mage_bench/mage/contrastive.py."""

    weight: float = 0.0  # 0 = plain MAGE: no second view is computed
    temperature: float = 0.2
    proj_hidden_dim: int | None = None  # None: the encoder width
    proj_dim: int = 128

    def validate(self, path: str) -> None:
        require(self.weight >= 0, f"{path}.weight must be >= 0")
        require(self.temperature > 0, f"{path}.temperature must be > 0")


TRAIN_AUGMENTS = ("auto", "none", "affine", "dataset", "center-flip")


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
    # auto | none | affine | dataset | center-flip; auto: affine for MAGE-C on in-memory data, none for MAGE
    # there; dataset (MAGE's random resized crop + flip) for folder data, center-flip with data.cache_tokens.
    augment: str = "auto"
    amp: str = "auto"  # auto (bf16 on capable GPUs, off on CPU) | off | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda
    # torch.compile the objective (forward and backward; inductor), meant for GPUs (not measured on one yet; on
    # 2 CPU cores mage_tiny's step is ~10% faster after a ~40 s first compilation). Numbers equal eager's only up
    # to float rounding (fused kernels reorder sums), so it is part of a run's identity.
    compile: bool = False
    checkpoint_every: int = 200
    log_every: int = 10
    # Training-time proxies (`mage_bench.proxies`): every `proxy_every` steps and at the last step, a kNN
    # top-1 of the probe feature on a fixed held-out subset and a small-sample FD of generated images go on
    # that step's metrics.jsonl line (a proxy step is always a log step). 0 turns each off. Measured on the
    # default tiny digits run (mage_tiny, 300 steps, one CPU thread, proxy time over training time, 2 runs):
    # every 150 with 128 samples 5.9-6.0%; every 100 with 128 9.3%; every 150 with 256 10.9%; every 100
    # with 256 15.7% (one call ~0.55 s at 128 samples, ~1.0 s at 256: the decoding is most of it).
    proxy_every: int = 150
    proxy_samples: int = 128  # images generated (and real train images) for the FD proxy; 0: no FD proxy
    proxy_knn_train: int = 1000  # train images (at most) as the kNN memory; 0: no kNN proxy
    proxy_knn_test: int = 500  # test images (at most) as the kNN queries; 0: no kNN proxy

    def validate(self, path: str) -> None:
        require(self.steps >= 1 and self.batch_size >= 2, f"{path}: steps >= 1 and batch_size >= 2 are required")
        require(self.blr > 0 and self.weight_decay >= 0, f"{path}: blr > 0 and weight_decay >= 0 are required")
        require(self.augment in TRAIN_AUGMENTS,
                 f"{path}.augment must be one of {', '.join(TRAIN_AUGMENTS)}, not {self.augment!r}")
        require(self.amp in ("auto", "off", "bf16", "fp16"), f"{path}.amp must be auto, off, bf16 or fp16")
        require(self.device in ("auto", "cpu", "cuda"), f"{path}.device must be auto, cpu or cuda")
        require(0 <= self.label_smoothing < 1, f"{path}.label_smoothing must be in [0, 1)")
        require(self.checkpoint_every >= 1 and self.log_every >= 1, f"{path}: checkpoint_every/log_every >= 1")
        require(self.proxy_every >= 0, f"{path}.proxy_every must be >= 0 (0: no training-time proxies)")
        require(self.proxy_samples == 0 or self.proxy_samples >= 2,
                f"{path}.proxy_samples must be 0 (no FD proxy) or >= 2 (a covariance needs two images)")
        require(self.proxy_knn_train >= 0 and self.proxy_knn_test >= 0,
                f"{path}.proxy_knn_train/proxy_knn_test must be >= 0 (0: no kNN proxy)")


@dataclass(frozen=True)
class GenerateConfig:
    """Iterative decoding defaults of a run (official script: 12 steps, temperature 4.5)."""

    steps: int = 12
    temperature: float = 4.5
    # How decoded [0, 1] pixels become 8-bit PNG values: "truncate" as the official code
    # (`astype(uint8)` of x * 255) or "round" (half a grey level brighter on average).
    png: str = "truncate"

    def validate(self, path: str) -> None:
        require(self.png in PNG_QUANTISATION, f"{path}.png must be truncate or round, not {self.png!r}")
        require(self.steps >= 1, f"{path}.steps must be >= 1")
        require(self.temperature >= 0, f"{path}.temperature must be >= 0")


# Run-config keys that change what a run logs, never what it computes (the training-time proxies: bitwise the
# same weights with or without them): left out of a run's identity, so its config hash, a resume's config check
# and a sweep's reuse of finished runs ignore them (and runs made before they existed still match).
OBSERVATION_KEYS = {"train": ("proxy_every", "proxy_samples", "proxy_knn_train", "proxy_knn_test")}


# Run-config keys added after run folders existed, with the value that means "as before": left out of a run's
# identity while they hold it, so folders and config hashes made before the key existed still match; any other
# value is part of the identity.
LATER_KEYS = {"data": {"cache_tokens": False}, "train": {"compile": False}}


def run_identity(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict without its OBSERVATION_KEYS and without LATER_KEYS at their old meaning (other dicts
    pass through unchanged)."""
    out = dict(data)
    for section, keys in OBSERVATION_KEYS.items():
        if isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if k not in keys}
    for section, defaults in LATER_KEYS.items():
        if isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if k not in defaults or v != defaults[k]}
    return out


EVAL_DEVICES = ("auto", "cpu", "cuda")
POOLING_NAMES = ("mean", "cls", "mean+cls")  # mage_bench.mage.model.POOLINGS
REAL_SPLITS = ("train", "test")


FEATURE_PIXEL_BUDGET = 2 ** 22  # pixels per feature-extraction batch by default (`EvalConfig.feature_batch_size`)


@dataclass(frozen=True)
class EvalConfig:
    """Every evaluation setting and its default, once. The CLI's evaluation flags are these names with
    dashes (`--num-samples`, `--real-split`, `--knn-temperature`, ...), a sweep spec's `eval:` section
    uses them as keys, and the evaluation runner reads nothing else."""

    # Generation metrics (FID/IS/KID/PR)
    # An evaluation profile (`mage_bench.eval.profiles`: mage-paper, adm, dgm-eval, cmmd, digits, or a user
    # profile's name or YAML file) pins the whole generation protocol; then num_samples, real_split, extractor
    # and backend stay unset (the profile decides them) and the metrics are the profile's.
    profile: str | None = None
    # A decoding sweep under the profile (`mage_bench.eval.decode_grid`): "temperature=3,4.5,6", "steps=8,12"; each
    # (steps, temperature) of the product evaluated once, apart from the profile's headline records
    decode_grid: tuple[str, ...] = ()
    # Under a profile: a run's images go from the decoder to the extractor in memory (exactly the pixels of their
    # PNG files, so the same features), no files written; off: PNGs under RUN/samples*, kept and reused
    stream_samples: bool = False
    num_samples: int | None = None  # images generated per run; None: as many as the reference split holds
    real_split: str = "train"  # split of a data set used as the real side
    extractor: str | None = None  # None: digits-cnn for the bundled digits, inception-v3 otherwise
    weights: str | None = None  # the extractor's weights file (else its own default place)
    backend: str = "torch-fidelity"  # torch-fidelity | clean-fid | clean-fid-legacy (mage_bench.eval.fid_backends)
    device: str = "auto"  # auto | cpu | cuda
    # Images per batch through the run's tokenizer and encoder when extracting features; None: sized by
    # the image size (`feature_batch_size`)
    batch_size: int | None = None
    # Which probe features the evaluators on features (linear, few-shot, kNN) read, all from one forward
    # pass: encoder blocks ("last", "all", or 0-based indices "0,3,last") x poolings ("mean": the official
    # mean of the block's tokens; "cls": the class token; "mean+cls": both, concatenated; comma-separated)
    layers: str = "last"
    pooling: str = "mean"
    # kNN (DINO's weighted vote) and retrieval
    knn_ks: tuple[int, ...] = (10, 20, 100, 200)
    knn_temperature: float = 0.07
    # Few-shot logistic regression: shots per class, seeded draws per shot count
    fewshot_shots: tuple[int, ...] = (1, 2, 5, 10)
    fewshot_draws: int = 5
    # The paper's linear-probe head (`eval linear --protocol mae|mae-cached`); None: the protocol's own
    # default (90 epochs, batch 4096, blr 0.1: `mage_bench.eval.linear.HeadSchedule`)
    probe_epochs: int | None = None
    probe_batch_size: int | None = None
    probe_blr: float | None = None
    # Masked reconstruction (`eval inpaint --masks`, a sweep's `eval.inpaint`): mask specs (random:R,
    # box:center, border:W, pixels:FILE; `mage_bench.mage.inpaint_masks`); empty: not evaluated in sweeps
    inpaint: tuple[str, ...] = ()
    inpaint_images: int = 1000  # test-split images completed per mask (at most the split's size)
    inpaint_steps: int | None = None  # decoding steps; None: the run's generate.steps
    inpaint_temperature: float | None = None  # re-masking temperature; None: the run's generate.temperature
    inpaint_argmax: bool = False  # take the most likely code at each step instead of sampling it
    inpaint_paste_back: bool = False  # known pixels of the input pasted over the decoded ones
    inpaint_dilate: int = 0  # pixel masks: grow the overlapping tokens by this many rings (official demo: 1)
    inpaint_fd: bool = True  # also the FD/FID of completed images against the real split (the extractor's)
    # End-to-end fine-tuning (`eval finetune`) of every run after the other evaluators, with this preset
    # (`mage_bench.eval.finetune.FINETUNE_PRESETS`: vit_base, vit_large, digits); None: not in sweeps
    finetune: str | None = None
    finetune_steps: int | None = None  # optimizer steps the schedule spans instead of the preset's epochs
    # Sweeps only: also evaluate raw pixels, the untrained model and real held-out images
    references: bool = True

    def validate(self, path: str) -> None:
        if self.profile is not None:  # the name itself is checked where it is used (`eval.runner.profile_for_runs`)
            pinned = [name for name, default in (("num_samples", None), ("real_split", "train"), ("extractor", None),
                                                 ("backend", "torch-fidelity")) if getattr(self, name) != default]
            require(not pinned, f"{path}.{pinned[0] if pinned else ''} is pinned by {path}.profile "
                                f"({self.profile}); drop it or use a profile that sets it")
        require(not self.stream_samples or self.profile is not None,
                f"{path}.stream_samples needs {path}.profile (streamed images are evaluated under a profile)")
        require(not self.decode_grid or self.profile is not None,
                f"{path}.decode_grid needs {path}.profile (the protocol every decoding setting is evaluated under)")
        require(self.num_samples is None or self.num_samples >= 2, f"{path}.num_samples must be >= 2")
        require(self.real_split in REAL_SPLITS, f"{path}.real_split must be train or test, not {self.real_split!r}")
        require(self.device in EVAL_DEVICES, f"{path}.device must be auto, cpu or cuda, not {self.device!r}")
        require(bool(self.knn_ks) and all(k >= 1 for k in self.knn_ks), f"{path}.knn_ks must be integers >= 1")
        require(self.knn_temperature > 0, f"{path}.knn_temperature must be > 0")
        require(bool(self.fewshot_shots) and all(k >= 1 for k in self.fewshot_shots),
                f"{path}.fewshot_shots must be integers >= 1")
        require(self.fewshot_draws >= 2, f"{path}.fewshot_draws must be >= 2 (a spread needs two draws)")
        for name in ("probe_epochs", "probe_batch_size", "batch_size"):
            value = getattr(self, name)
            require(value is None or value >= 1, f"{path}.{name} must be >= 1")
        require(self.probe_blr is None or self.probe_blr > 0, f"{path}.probe_blr must be > 0")
        require(all(part.strip() in ("last", "all") or part.strip().isdigit() for part in self.layers.split(",")),
                f"{path}.layers must be last, all or 0-based block indices like 0,3,last, not {self.layers!r}")
        require(all(part.strip() in POOLING_NAMES for part in self.pooling.split(",")),
                f"{path}.pooling must be {', '.join(POOLING_NAMES)} (or several, comma-separated), "
                f"not {self.pooling!r}")
        require(self.inpaint_images >= 2, f"{path}.inpaint_images must be >= 2")
        require(self.inpaint_steps is None or self.inpaint_steps >= 1, f"{path}.inpaint_steps must be >= 1")
        require(self.inpaint_temperature is None or self.inpaint_temperature >= 0,
                f"{path}.inpaint_temperature must be >= 0")
        require(self.inpaint_dilate >= 0, f"{path}.inpaint_dilate must be >= 0")
        require(self.finetune_steps is None or self.finetune_steps >= 1, f"{path}.finetune_steps must be >= 1")
        if self.inpaint:
            from mage_bench.mage.inpaint_masks import parse_masks

            try:
                parse_masks(self.inpaint)
            except UserError as exc:
                raise ConfigError(f"{path}.inpaint: {exc}") from None

    def feature_batch_size(self, image_size: int) -> int:
        """Images per feature-extraction batch: the setting, else 256 up to 128 px and a budget of 2^22 pixels
        above (64 images at 256 px). The VQGAN encoder's fp32 activations grow with the pixels (about 35 GB
        for 256 images of 256 px, est.), so a fixed 256 would not fit a 32-40 GB GPU."""
        if self.batch_size is not None:
            return self.batch_size
        return max(1, min(256, FEATURE_PIXEL_BUDGET // (image_size * image_size)))

    def feature_views(self, depth: int) -> list[tuple[int, str]]:
        """The (block index, pooling) pairs `layers` x `pooling` name for an encoder of `depth` blocks, each once,
        in order; an index beyond the encoder is a ConfigError."""
        blocks: list[int] = []
        for part in (p.strip() for p in self.layers.split(",")):
            blocks += range(depth) if part == "all" else [depth - 1] if part == "last" else [int(part)]
        too_deep = [b for b in blocks if b >= depth]
        require(not too_deep, f"eval.layers: block {too_deep[0] if too_deep else 0} does not exist; the encoder has "
                              f"{depth} blocks (0..{depth - 1}, last = {depth - 1})")
        poolings = [p.strip() for p in self.pooling.split(",")]
        return list(dict.fromkeys((block, pooling) for block in blocks for pooling in poolings))

    def probe_schedule(self) -> dict[str, Any]:
        """The linear-probe head settings given (epochs, batch_size, blr), for `HeadSchedule`."""
        given = {"epochs": self.probe_epochs, "batch_size": self.probe_batch_size, "blr": self.probe_blr}
        return {k: v for k, v in given.items() if v is not None}


DEFAULT_EVAL = EvalConfig()  # frozen, so one shared instance serves as every function's default


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
