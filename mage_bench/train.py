"""`train(config, run_dir)`: the MAGE training loop.

Official recipe: AdamW betas (0.9, 0.95), weight decay 0.05 on every parameter except 1-D ones and
biases (timm 0.3.2's add_weight_decay, which the official code uses: embeddings *are* decayed),
lr = blr * effective batch / 256, linear warmup then half-cycle cosine, gradient clipping, autocast
on GPU with fp32 attention logits. DDP when launched by torchrun (gloo on CPU, nccl on GPU); the
objective through torch.compile with `train.compile` (after the DDP wrapper, whose bucketing dynamo's
DDP optimiser follows).

Exactness: one global batch order per epoch (a pure function of seed and epoch), sliced by rank;
masking ratios and augmentations are drawn for the whole global batch from generators every process
holds in the same state; each row's token order is a pure function of (seed, step, view, global row)
(`masking.rank_token_masks`), drawn by each process for its own rows on its device. So N steps
straight == N/2 + resume N/2 bitwise on CPU, and 2 processes x batch B match 1 process x batch 2B
(dropout off, `masking.per: batch`; under the default per-process ratios each rank's rows get their
own ratio, as officially).

Host syncs: a step reads no value of a device tensor (in fp32 and bf16; fp16's GradScaler reads its
overflow check). The losses are summed on the device and read,
reduced over processes and checked for non-finite values once per log record and before each
checkpoint; the encoder's length comes from the config, not from the drop mask.

The objective is `mage.objective`; the folder, resume, loop, log and checkpoints are the skeleton
`mage_bench.training` shares with the tokenizer trainer. Rank 0 adds the training-time proxies
(`mage_bench.proxies`: kNN top-1 and a small-sample FD) to the log line of every proxy step; they draw
nothing from the training's random streams, so the weights are those of a run without them.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mage_bench.config import RunConfig, TrainConfig, dump_yaml, to_dict
from mage_bench.data import create_dataset, is_in_memory
from mage_bench.errors import ConfigError, UserError
from mage_bench.io import atomic_torch_save, atomic_write_json, atomic_write_text, check_output_folder
from mage_bench.mage import objective
from mage_bench.mage.masking import batch_ratios, num_dropped, rank_token_masks, resolve_masking
from mage_bench.mage.model import MAGE
from mage_bench.proxies import TrainingProxies, proxies_enabled, proxy_due
from mage_bench.runs import CHECKPOINT_FILE, CONFIG_FILE, LAUNCH_FILE, read_launch
from mage_bench.schedule import warmup_cosine
from mage_bench.training import Cadence, TrainingFailed, TrainingFolder, rng_state, run_steps, set_rng_state

# `TrainingFailed` is defined in `training` (the tokenizer trainer raises it too); the CLI and sweeps
# import it from here.


# --------------------------------------------------------------------------------------------
# Config resolution: every "auto" becomes a concrete value recorded in config.yaml


def resolve_automatic(config: RunConfig) -> RunConfig:
    """Every "auto"/None choice replaced by what will run, checked across sections, without touching
    the tokenizer folder (so a sweep can compare its points before the tokenizer exists)."""
    masking = config.masking
    distribution, mask_ratio_min = resolve_masking(masking.spec, masking.mask_ratio_min, masking.clamp_to_drop)
    augment = config.train.augment
    cached = config.data.cache_tokens
    if cached and is_in_memory(config.data):
        raise ConfigError(f"data.cache_tokens applies to folder data sets; {config.data.name} is in memory and its "
                          "tokens are computed once already (with train.augment: none): remove data.cache_tokens")
    if augment == "auto":
        if is_in_memory(config.data):
            augment = "affine" if config.contrastive.weight > 0 else "none"
        else:
            augment = "center-flip" if cached else "dataset"
    if cached and augment != "center-flip":
        raise ConfigError(f"data.cache_tokens trains on the cached centre crop and its flip, but train.augment is "
                          f"{augment}: set train.augment to auto or center-flip, or turn data.cache_tokens off")
    if augment == "center-flip" and not cached:
        raise ConfigError("train.augment: center-flip is the view set of cached tokens: set data.cache_tokens: true "
                          "(or use train.augment: dataset for random crops)")
    if cached and config.contrastive.weight > 0:
        raise ConfigError("contrastive.weight > 0 needs two random views of each image per step; data.cache_tokens "
                          "holds two fixed views: turn data.cache_tokens off for MAGE-C")
    if augment == "dataset" and is_in_memory(config.data):
        raise ConfigError(f"train.augment: dataset needs a folder data set; {config.data.name} is in memory "
                          "(use none or affine)")
    if augment in ("none", "affine") and not is_in_memory(config.data):
        raise ConfigError(f"train.augment: {augment} applies to in-memory data only; use dataset for {config.data.name}")
    if config.contrastive.weight > 0 and augment == "none":
        raise ConfigError("contrastive.weight > 0 needs two different views: set train.augment to affine (or auto)")
    resolved = dataclasses.replace(masking, spec=distribution.spec(), mask_ratio_min=mask_ratio_min)
    # The distribution was built to resolve the masking: hand it on in the section's cache, so the
    # trainer (and whoever reads `config.masking.distribution`) does not parse the spec again. It is
    # the distribution of the new spec: the spec writes its parameters as exact float reprs.
    resolved.__dict__["distribution"] = distribution
    train_section = dataclasses.replace(config.train, augment=augment)
    return dataclasses.replace(config, masking=resolved, train=train_section)


def resolve_run_config(config: RunConfig) -> RunConfig:
    """`resolve_automatic`, then the checks against the tokenizer the run will use."""
    from mage_bench.tokenizer import tokenizer_config_at

    config = resolve_automatic(config)
    tok = tokenizer_config_at(config.tokenizer)
    if tok.token_grid ** 2 != config.model.num_tokens or tok.n_embed != config.model.codebook_size:
        raise ConfigError(f"model {config.model.name} expects {config.model.num_tokens} tokens from "
                          f"{config.model.codebook_size} codes, but tokenizer {config.tokenizer} gives "
                          f"{tok.token_grid ** 2} from {tok.n_embed}; set model.num_tokens and model.codebook_size")
    if tok.resolution != config.data.image_size:
        raise ConfigError(f"data.image_size={config.data.image_size} but tokenizer {config.tokenizer} is built "
                          f"for {tok.resolution} px; set data.image_size: {tok.resolution}")
    return config


# --------------------------------------------------------------------------------------------
# Processes and devices


@dataclass(frozen=True)
class Runtime:
    rank: int
    world: int
    device: torch.device
    amp_dtype: torch.dtype | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(config: RunConfig) -> Runtime:
    """Join the torchrun process group when there is one; choose device and autocast dtype."""
    want_cuda = config.train.device == "cuda" or (config.train.device == "auto" and torch.cuda.is_available())
    if config.train.device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device: cuda asked for, but no CUDA device is visible; use auto or cpu")
    rank, world, device = join_torchrun(want_cuda)
    amp = config.train.amp
    if amp == "auto":
        amp = ("bf16" if bf16_native() else "fp16") if want_cuda else "off"
    if amp != "off" and not want_cuda:
        raise ConfigError(f"train.amp: {amp} needs a GPU; CPU training runs in fp32 (use auto or off)")
    dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return Runtime(rank, world, device, dtype)


def join_torchrun(cuda: bool) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process, which joins torchrun's process group when there are 2+
    processes (nccl on GPUs, gloo on CPU); the device is cuda:LOCAL_RANK, made current, or the CPU. Shared
    by pre-training and fine-tuning (`eval.finetune.setup_runtime`)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return rank, world, device


def bf16_native() -> bool:
    """Whether the GPU computes bf16 in hardware: V100 and T4 only emulate it (slower than fp32), and
    `is_bf16_supported()` says yes to emulation unless told otherwise."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


# --------------------------------------------------------------------------------------------
# Tokens for each step


def random_affine(images: torch.Tensor, generator: torch.Generator, max_shift: float = 0.125,
                  scale: tuple[float, float] = (0.9, 1.1)) -> torch.Tensor:
    """Per-image random shift and zoom (no flips: they change a digit's class), zero padding."""
    n = images.shape[0]
    s = torch.empty(n).uniform_(*scale, generator=generator)
    t = torch.empty(n, 2).uniform_(-2 * max_shift, 2 * max_shift, generator=generator)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / s
    theta[:, :, 2] = t
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class MultiView:
    """A folder data set whose items are `views` independent random transforms of one image, decoded
    once (MAGE-C's two views of a JPEG cost one decode) when the data set can hand out its decoded image."""

    def __init__(self, dataset: Any, views: int) -> None:
        self.dataset, self.views = dataset, views

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        if self.views > 1 and hasattr(self.dataset, "load"):
            image, _ = self.dataset.load(index)
            return tuple(self.dataset.transform(image) for _ in range(self.views))
        return tuple(self.dataset[index][0] for _ in range(self.views))


class EpochSampler(torch.utils.data.Sampler):
    """This process's indices of one epoch from `position` batches on: torch's DistributedSampler order
    (shuffled from the seed and the epoch), set before each pass. One DataLoader then serves every epoch,
    so its workers persist instead of being forked again each epoch."""

    def __init__(self, dataset: Any, world: int, rank: int, seed: int, batch: int, batches: int) -> None:
        from torch.utils.data import DistributedSampler

        self.order = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                        drop_last=True)
        self.batch, self.batches, self.position = batch, batches, 0

    def start(self, epoch: int, position: int) -> None:
        self.order.set_epoch(epoch)
        self.position = position

    def __iter__(self):
        return iter(list(self.order)[self.position * self.batch:self.batches * self.batch])

    def __len__(self) -> int:
        return (self.batches - self.position) * self.batch


class TokenStream:
    """Yields per step this process's tokens (B, L) and, for MAGE-C, a second view (or None).

    In-memory data: one global batch order per epoch, sliced by rank (exactly reproducible).
    Folder data: a DataLoader with torch's DistributedSampler (shuffled per epoch from the seed,
    each rank its share) and `data.num_workers` workers; resume skips the batches already seen.
    Folder data with `data.cache_tokens` (`train.augment: center-flip`): the cached tokens of each image's
    centre crop and its flip (`mage_bench.token_cache`), in the in-memory order, one view drawn per image.
    """

    def __init__(self, config: RunConfig, runtime: Runtime, tokenizer: nn.Module, views: int,
                 progress: bool = False) -> None:
        self.config, self.runtime, self.tokenizer, self.views = config, runtime, tokenizer, views
        self.batch, self.global_batch = config.train.batch_size, config.train.batch_size * runtime.world
        self.dataset = create_dataset(config.data, "train", train_transform=config.train.augment == "dataset")
        self.view_tokens, self.token_cache = None, None  # data.cache_tokens: int[N, 2, L] on the CPU, its description
        if len(self.dataset) < self.global_batch:
            raise UserError(f"the data set has {len(self.dataset)} images, fewer than one global batch of "
                            f"{self.global_batch}; lower train.batch_size")
        self.batches_per_epoch = len(self.dataset) // self.global_batch
        self.epoch, self.position = 0, 0
        self.augment_generator = torch.Generator().manual_seed(config.seed * 7 + 3)
        self.cached_tokens = None
        self._loader, self._loader_iter = None, None
        if config.train.augment == "none":  # no augmentation: tokenize the data set once
            images, _ = self.dataset.tensors()
            self.cached_tokens = torch.cat([self._tokenize(images[i:i + 512]) for i in range(0, len(images), 512)])
        elif config.train.augment == "center-flip":  # folder data, each image's two fixed views tokenised once
            from mage_bench import token_cache

            encode = "fp16-autocast" if runtime.amp_dtype is not None else "fp32"
            key = token_cache.cache_key(config.tokenizer, config.data, self.dataset, encode)
            self.view_tokens, self.token_cache = token_cache.view_tokens(
                key, self.dataset, self._tokenize, runtime.rank, runtime.world, config.data.num_workers,
                progress and runtime.is_main)

    @torch.no_grad()
    def _tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, L) tokens on the training device. With mixed precision on, the VQGAN encoder runs under fp16
        autocast, as the official pre-training tokenizes (in fp32 it costs about as much as ViT-B's forward
        and backward), whatever the ViT's dtype: measured on the CPU, fp16 keeps 99.8-99.98% of the fp32
        tokens and bf16 only 96.9-99.2%. The nearest-code search stays fp32 (`VectorQuantizer.nearest`)."""
        dev = self.runtime.device
        with torch.autocast(dev.type, dtype=torch.float16, enabled=self.runtime.amp_dtype is not None):
            return self.tokenizer.encode(images.to(dev, non_blocking=True)).flatten(1)

    def _order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.dataset), generator=g)

    def rank_slice(self, x: torch.Tensor) -> torch.Tensor:
        """This process's rows of a global-batch tensor."""
        lo = self.runtime.rank * self.batch
        return x[lo:lo + self.batch]

    def _folder_batch(self) -> tuple[torch.Tensor, ...]:
        if self._loader is None:
            from torch.utils.data import DataLoader

            self._sampler = EpochSampler(self.dataset, self.runtime.world, self.runtime.rank, self.config.seed,
                                         self.batch, self.batches_per_epoch)
            workers = self.config.data.num_workers
            self._loader = DataLoader(MultiView(self.dataset, self.views), batch_size=self.batch,
                                      sampler=self._sampler, num_workers=workers, drop_last=True,
                                      pin_memory=self.runtime.device.type == "cuda", persistent_workers=workers > 0)
        if self._loader_iter is None:
            self._sampler.start(self.epoch, self.position)
            self._loader_iter = iter(self._loader)
        return next(self._loader_iter)

    def next(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.position == self.batches_per_epoch:
            self.epoch, self.position, self._loader_iter = self.epoch + 1, 0, None
        if self.config.train.augment == "dataset":
            views = list(self._folder_batch())
            self.position += 1
        else:
            order = self._order()[self.position * self.global_batch:(self.position + 1) * self.global_batch]
            self.position += 1
            if self.cached_tokens is not None:
                return self.rank_slice(self.cached_tokens[order.to(self.cached_tokens.device)]), None
            if self.view_tokens is not None:  # one of the two cached views per image, drawn for the global batch
                flips = torch.randint(0, 2, (len(order),), generator=self.augment_generator)
                tokens = self.rank_slice(self.view_tokens[order, flips])
                return tokens.to(self.runtime.device, torch.long, non_blocking=True), None
            images, _ = self.dataset.tensors()
            views = [self.rank_slice(random_affine(images[order], self.augment_generator)) for _ in range(self.views)]
        tokens = [self._tokenize(v) for v in views]
        return tokens[0], (tokens[1] if self.views > 1 else None)

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "augment_generator": self.augment_generator.get_state()}

    def load(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.augment_generator.set_state(state["augment_generator"])
        self._loader_iter = None


# --------------------------------------------------------------------------------------------
# The objective (`mage.objective`) and the optimizer's settings


class MageObjective(objective.MageObjective):
    """`mage.objective.MageObjective` with its settings read from a run config (`train.label_smoothing`,
    the `contrastive` section): what `Trainer` and `mage_bench.bench` build."""

    def __init__(self, model: MAGE, config: RunConfig) -> None:
        c = config.contrastive
        super().__init__(model, label_smoothing=config.train.label_smoothing, contrastive_weight=c.weight,
                         temperature=c.temperature, proj_hidden_dim=c.proj_hidden_dim, proj_dim=c.proj_dim,
                         n_drop=None if config.masking.mask_ratio_min is None  # unresolved: read from the masks
                         else num_dropped(config.model.num_tokens, config.masking.mask_ratio_min))


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """timm 0.3.2 add_weight_decay, as the official code: no decay for 1-D parameters and biases."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def lr_at(step: int, base_lr: float, config: RunConfig) -> float:
    """Official schedule per iteration: linear warmup from 0, then half-cycle cosine to min_lr."""
    t = config.train
    # The schedule's floor is relative; min_lr is absolute. With min_lr = 0 (every built-in preset) the
    # ratio is 0.0 and the numbers are bitwise those of the official min_lr + (base_lr - min_lr) * ...;
    # another min_lr can differ from that formula in the last bit.
    return warmup_cosine(step, t.steps, t.warmup_steps, base_lr, floor_ratio=t.min_lr / base_lr)


# --------------------------------------------------------------------------------------------
# The loop


class Trainer:
    """One training process's state and its step, shared by `train`, the DDP test and the benchmark."""

    def __init__(self, config: RunConfig, runtime: Runtime, progress: bool = False) -> None:
        from mage_bench.tokenizer import load_tokenizer

        self.config, self.runtime, t = config, runtime, config.train
        torch.set_flush_denormal(True)  # denormals slow CPU matmuls several-fold late in training
        torch.manual_seed(config.seed)  # identical initial weights on every process
        self.model = MAGE(config.model)
        self.objective = MageObjective(self.model, config).to(runtime.device)
        self.base_lr = t.blr * t.batch_size * runtime.world / 256
        # foreach: one multi-tensor update instead of a Python loop over the parameters (torch's default on
        # GPUs, not on CPU): bitwise the same weights; on 2 CPU cores the update of mage_tiny at batch 128
        # takes 4.4 ms instead of 5.0 (medians of 120 interleaved steps; the whole step ~55 ms).
        self.optimizer = torch.optim.AdamW(param_groups(self.objective, t.weight_decay), lr=self.base_lr,
                                           betas=t.betas, foreach=True)
        self.scaler = torch.amp.GradScaler("cuda", enabled=runtime.amp_dtype == torch.float16)
        tokenizer = load_tokenizer(config.tokenizer).to(runtime.device)
        self.stream = TokenStream(config, runtime, tokenizer, 2 if config.contrastive.weight > 0 else 1, progress)
        self.masking = config.masking.distribution  # built once, when the config was resolved
        self.mask_generator = torch.Generator().manual_seed(config.seed * 13 + 5)
        torch.manual_seed(config.seed * 7919 + runtime.rank + 1)  # dropout: a stream per process
        self.wrapped: nn.Module = self.objective
        if runtime.world > 1:
            self.wrapped = nn.parallel.DistributedDataParallel(
                self.objective, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
        if t.compile:  # the same parameters: checkpoints, the optimizer and the proxies see the eager modules
            self.wrapped = torch.compile(self.wrapped)
        self.objective.train()

    def _masks(self, ratios: torch.Tensor, L: int, step: int, view: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's rows' masks, drawn on its device from (seed, step, view, global row)."""
        rows = self.stream.rank_slice(ratios).to(self.runtime.device, non_blocking=True)
        return rank_token_masks(rows, L, self.config.masking.mask_ratio_min, seed=self.config.seed, step=step,
                                view=view, first_row=self.runtime.rank * self.stream.batch)

    def forward_backward(self, step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Draw the step's batch and masks, compute the losses and gradients (DDP-averaged).

        Nothing here waits for the device: non-finite losses are caught by `WindowedSteps` when it reads them."""
        dev = self.runtime.device
        tokens, tokens2 = self.stream.next()
        masking = self.config.masking
        ratios = batch_ratios(self.masking, self.stream.batch, masking.per, self.runtime.world, self.mask_generator)
        if masking.clamp_to_drop:  # draws below the drop share mask (at least) the dropped tokens
            ratios = ratios.clamp(min=masking.mask_ratio_min)
        mask, drop = self._masks(ratios, tokens.shape[1], step, view=0)
        # MAGE-C: the second view gets its own token order with the same ratios.
        second = (tokens2.to(dev), *self._masks(ratios, tokens.shape[1], step, view=1)) if tokens2 is not None else None
        with torch.autocast(dev.type, dtype=self.runtime.amp_dtype or torch.float32,
                            enabled=self.runtime.amp_dtype is not None):
            losses = self.wrapped(tokens.to(dev), mask, drop, second)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["loss"]).backward()
        return losses, ratios

    def optimizer_step(self, step: int) -> float:
        lr = lr_at(step, self.base_lr, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.unscale_(self.optimizer)
        # foreach: the norms and the scaling as multi-tensor ops on the CPU too (torch picks them only on GPUs):
        # bitwise the same gradients, ~0.6 ms less per tiny step on 2 cores.
        nn.utils.clip_grad_norm_(self.objective.parameters(), self.config.train.grad_clip, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return lr

    def global_mean(self, sums: torch.Tensor, count: int) -> list[float]:
        """Per-process sums (a device tensor) -> their mean over `count` steps and every process (equal
        batches): one all-reduce and one read of the device, for a log record."""
        totals = sums.detach().clone()
        if self.runtime.world > 1:
            dist.all_reduce(totals)
        return (totals / (count * self.runtime.world)).tolist()

    def state(self, step: int, elapsed: float) -> dict[str, Any] | None:
        """The checkpoint (on rank 0; None elsewhere). Collective: every process must call it.

        `torch_rng` holds every process's random state, the CPU's and its GPU's (dropout draws on the GPU)."""
        rng_states = [rng_state(self.runtime.device)]
        if self.runtime.world > 1:
            rng_states = [None] * self.runtime.world
            dist.all_gather_object(rng_states, {k: v.cpu() for k, v in rng_state(self.runtime.device).items()})
        if not self.runtime.is_main:
            return None
        head = self.objective.head
        return {
            "config": to_dict(self.config), "model": self.model.state_dict(),
            "head": head.state_dict() if head is not None else None,
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "scheduler": {"kind": "warmup_cosine", "base_lr": self.base_lr, "step": step},
            "data": self.stream.state(), "mask_generator": self.mask_generator.get_state(),
            "torch_rng": rng_states, "step": step, "elapsed_s": elapsed,
        }

    def load(self, state: dict[str, Any]) -> tuple[int, float]:
        self.model.load_state_dict(state["model"])
        if self.objective.head is not None:
            self.objective.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.stream.load(state["data"])
        self.mask_generator.set_state(state["mask_generator"])
        rng = state["torch_rng"]
        set_rng_state(rng[self.runtime.rank] if self.runtime.rank < len(rng) else rng[0], self.runtime.device)
        return int(state["step"]), float(state["elapsed_s"])


class WindowedSteps:
    """A `Trainer`'s steps for `training.run_steps`: each metrics.jsonl record holds the losses and mask
    ratio averaged over the steps since the previous record, and the lr of the last one.

    The losses are summed on the device (fp64) and read once per record (and before each checkpoint),
    reduced over processes: so every process sees the same values and a non-finite loss stops all of
    them together, before a checkpoint could save its effects."""

    failure_hint = "lower train.blr or raise train.warmup_steps"

    def __init__(self, trainer: Trainer, proxies: TrainingProxies | None = None) -> None:
        self.trainer, self.proxies = trainer, proxies  # proxies: rank 0's, or None (other ranks, or off)
        self.keys: list[str] | None = None
        self.sums: torch.Tensor | None = None  # [len(keys)] on the device
        self.mask_ratio: torch.Tensor | float = 0.0  # sum over the window (the ratios live on the host)
        self.window_steps, self.window_start, self.lr = 0, 0, 0.0

    def train_step(self, step: int) -> None:
        losses, ratios = self.trainer.forward_backward(step)
        self.lr = self.trainer.optimizer_step(step)
        if self.keys is None:
            self.keys = sorted(losses)
        values = torch.stack([losses[k].detach().to(torch.float64) for k in self.keys])
        if self.window_steps == 0:
            self.sums, self.window_start = values, step
        else:
            self.sums = self.sums + values
        self.mask_ratio = self.mask_ratio + ratios.double().mean()  # read with the losses, in `log_record`
        self.window_steps += 1

    def _window_means(self) -> dict[str, float]:
        """The window's mean losses over every process; `TrainingFailed` if one is not finite. Collective."""
        means = dict(zip(self.keys, self.trainer.global_mean(self.sums, self.window_steps), strict=True))
        if not all(math.isfinite(v) for v in means.values()):
            last = self.window_start + self.window_steps - 1
            where = f"at step {last}" if last == self.window_start else f"between steps {self.window_start} and {last}"
            raise TrainingFailed(f"non-finite loss ({means['loss']}) {where}")
        return means

    def log_record(self, step: int, time_s: float) -> dict[str, Any]:
        means = self._window_means() if self.window_steps else {}
        record = {"step": step, "epoch": self.trainer.stream.epoch, "lr": self.lr, **means,
                  "mask_ratio": float(self.mask_ratio) / max(self.window_steps, 1), "time_s": round(time_s, 3)}
        device = self.trainer.runtime.device
        if device.type == "cuda":  # this process's allocator high-water mark so far (GPU runs only)
            record["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        self.sums, self.mask_ratio, self.window_steps = None, 0.0, 0
        if self.proxies is not None and self.proxies.due(step):  # rank 0 only; the others go on to the
            record.update(self.proxies(step))  # next step and wait for it in its first collective
        return record

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        return {"loss": f"{record['loss']:.3f}"}

    def state(self, step: int, elapsed: float) -> dict[str, Any] | None:
        if self.window_steps:  # steps since the last record: never checkpoint a non-finite state
            self._window_means()
        return self.trainer.state(step, elapsed)


@dataclass(frozen=True)
class ProxyCadence(Cadence):
    """`Cadence` whose proxy steps are log steps too: the proxies go on that step's metrics.jsonl line, so
    resuming rewinds them with it."""

    train: TrainConfig | None = None

    def logs_at(self, step: int) -> bool:
        return super().logs_at(step) or (self.train is not None and proxy_due(step, self.train))


def launch_record(config: RunConfig, world: int) -> dict[str, Any]:
    """How the run trains on `world` processes, beyond its config: the numbers depend on the process
    count through the global batch and the lr scaled from it (RUN/launch.json, each run's `launch` in
    sweep.json, the sweep's dry run)."""
    global_batch = config.train.batch_size * world
    return {"world_size": world, "batch_per_process": config.train.batch_size, "global_batch": global_batch,
            "lr": config.train.blr * global_batch / 256}


def cpu_threads_record(resumed: Path | None) -> dict[str, Any]:
    """launch.json's `cpu_threads`: torch's threads for this launch. `resumed`: the run folder when this
    launch continues trained steps; an earlier launch on other threads (or on unrecorded ones, "unknown":
    folders from before this was recorded) is kept in `cpu_threads_before`, since the run's numbers are then
    not bitwise those of one launch."""
    threads = torch.get_num_threads()
    if resumed is None:
        return {"cpu_threads": threads}
    recorded = read_launch(resumed) or {}
    before = list(recorded.get("cpu_threads_before", []))
    earlier = recorded.get("cpu_threads", "unknown")
    if earlier != threads:
        before.append(earlier)
    return {"cpu_threads": threads, **({"cpu_threads_before": before} if before else {})}


def check_same_launch(run: Path, launch: dict[str, Any]) -> None:
    """Resuming on another number of processes would change the recipe (global batch, lr) mid-run."""
    recorded = read_launch(run)
    if recorded is None:  # folders from before launch.json was written
        return
    if recorded.get("world_size") != launch["world_size"]:
        raise UserError(f"{run} trained with {recorded.get('world_size')} processes (global batch "
                        f"{recorded.get('global_batch')}); resuming with {launch['world_size']} (global batch "
                        f"{launch['global_batch']}) would change the recipe mid-run: resume with "
                        f"{recorded.get('world_size')} processes, or start over on purpose in another run folder "
                        "(or delete this one)")


def train(config: RunConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
          stop_at: int | None = None) -> dict[str, Any]:
    """Train MAGE into `run_dir` (or continue it with `resume`); returns a summary.

    `stop_at` ends the loop after that many steps with a checkpoint, as an interruption would.
    """
    run = Path(run_dir)
    check_output_folder(run, run / CHECKPOINT_FILE, resume, "a run folder", "a checkpoint")
    config = resolve_run_config(config)
    runtime = setup_runtime(config)
    launch = launch_record(config, runtime.world)
    if resume and (run / CHECKPOINT_FILE).exists():
        check_same_launch(run, launch)
    trainer = Trainer(config, runtime, progress)
    folder = TrainingFolder(run, CHECKPOINT_FILE, runtime.is_main)
    tcfg = config.train
    step, elapsed = folder.begin(config, resume, trainer.load)
    if runtime.device.type == "cpu":  # the last bits of CPU numbers depend on the thread count
        launch = {**launch, **cpu_threads_record(run if step > 0 else None)}
    if trainer.stream.token_cache is not None:  # data.cache_tokens: where the tokens came from, and their key
        launch = {**launch, "token_cache": trainer.stream.token_cache}
    finished = step >= tcfg.steps
    if runtime.is_main and not (finished and read_launch(run) is not None):  # a no-op resume trains nothing
        atomic_write_json(run / LAUNCH_FILE, launch)
    if finished:  # finished already: resuming is a no-op
        return {"run": str(run), "step": step, "finished": True}
    cadence = ProxyCadence(tcfg.steps, tcfg.log_every, tcfg.checkpoint_every, tcfg)
    proxies = (TrainingProxies(config, trainer.model, trainer.stream.tokenizer, runtime.device)
               if runtime.is_main and proxies_enabled(tcfg) else None)
    step, elapsed = run_steps(WindowedSteps(trainer, proxies), folder, cadence, (step, elapsed), stop_at, progress,
                              desc="train")
    return {"run": str(run), "step": step, "finished": step >= tcfg.steps, "train_time_s": round(elapsed, 1)}


def save_initial_checkpoint(config: RunConfig, run_dir: str | Path) -> Path:
    """The model as initialised by `config.seed`, saved as a run folder at step 0.

    This is the "nothing learned" reference of a sweep: the same architecture, tokenizer and seed as
    the trained runs, evaluated by the same evaluators. Written once; an existing one is kept.
    """
    run = Path(run_dir)
    checkpoint_path = run / CHECKPOINT_FILE
    if checkpoint_path.exists():
        return checkpoint_path
    config = resolve_run_config(config)
    trainer = Trainer(config, setup_runtime(config))
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run / CONFIG_FILE, dump_yaml(config))
    atomic_torch_save(trainer.state(0, 0.0), checkpoint_path)
    return checkpoint_path
