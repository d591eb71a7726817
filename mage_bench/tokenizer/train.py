"""Training a small VQGAN tokenizer on the user's own data (the official code has none).

Loss: L1 + L2 reconstruction + codebook/commitment terms, optionally a patch-GAN hinge loss.
The codebook is kept alive with k-means initialisation from the first encoder outputs and
restarts of codes unused over a window (re-seeded from current encoder outputs).

Resume is exact for in-memory data sets (digits): the checkpoint holds the model, optimizers,
the data position and every RNG state, so N steps straight == N/2 + resume N/2, bitwise.
The folder, resume, loop, log and checkpoints are the skeleton `mage_bench.training` shares with MAGE
training; the card is a `mage_bench.cards.ModelCard`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from mage_bench.cards import CARD_FILE, ModelCard, describe_files, write_card
from mage_bench.config import TokenizerJobConfig, TokenizerTrainConfig, to_dict
from mage_bench.errors import UserError
from mage_bench.io import atomic_torch_save, check_output_folder, git_commit, package_versions
from mage_bench.schedule import warmup_cosine
from mage_bench.tokenizer import WEIGHTS_FILE, tokenizer_payload
from mage_bench.tokenizer.vqgan import VQGAN
from mage_bench.training import Cadence, TrainingFailed, TrainingFolder, rng_state, run_steps, set_rng_state

STATE_FILE = "train_state.pt"


class TrainingDiverged(TrainingFailed):
    """A non-finite loss: training stops; the last good checkpoint is kept on disk."""


# --------------------------------------------------------------------------------------------
# Data: a resumable stream of batches. Position = (epoch, batch within epoch).


class BatchStream:
    """Shuffled batches, each epoch's order a pure function of (seed, epoch) so resume is exact."""

    def __init__(self, dataset: Any, batch_size: int, seed: int, num_workers: int = 0) -> None:
        if len(dataset) < batch_size:
            raise UserError(f"the data set has {len(dataset)} images, fewer than train.batch_size="
                            f"{batch_size}; lower the batch size")
        self.dataset, self.batch_size, self.seed, self.num_workers = dataset, batch_size, seed, num_workers
        self.in_memory = hasattr(dataset, "tensors")
        self.batches_per_epoch = len(dataset) // batch_size  # drop the ragged last batch
        self.epoch, self.batch = 0, 0

    def _order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.dataset), generator=g)

    def __iter__(self):
        while True:
            order = self._order(self.epoch)
            start = self.batch * self.batch_size
            stop = self.batches_per_epoch * self.batch_size
            if self.in_memory:
                images, _ = self.dataset.tensors()
                for lo in range(start, stop, self.batch_size):
                    self.batch += 1
                    yield images[order[lo:lo + self.batch_size]]
            else:
                loader = torch.utils.data.DataLoader(
                    self.dataset, batch_size=self.batch_size, sampler=order[start:stop].tolist(),
                    num_workers=self.num_workers, drop_last=True,
                    generator=torch.Generator().manual_seed(self.seed + self.epoch))
                for images, _ in loader:
                    self.batch += 1
                    yield images
            self.epoch, self.batch = self.epoch + 1, 0

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load(self, state: dict[str, int]) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


# --------------------------------------------------------------------------------------------
# Codebook care


@torch.no_grad()
def kmeans(vectors: torch.Tensor, k: int, generator: torch.Generator, iters: int = 10) -> torch.Tensor:
    """Lloyd's k-means on vectors [N, D] -> centroids [k, D]; empty clusters re-drawn from the data."""
    n = vectors.shape[0]
    centroids = vectors[torch.randint(n, (k,), generator=generator)].clone()
    for _ in range(iters):
        assign = torch.cdist(vectors, centroids).argmin(1)  # [N]
        sums = torch.zeros_like(centroids).index_add_(0, assign, vectors)
        counts = torch.bincount(assign, minlength=k).to(vectors.dtype)[:, None]
        empty = counts[:, 0] == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp(min=1))
        if empty.any():
            centroids[empty] = vectors[torch.randint(n, (int(empty.sum()),), generator=generator)]
    return centroids


def latent_vectors(z: torch.Tensor) -> torch.Tensor:
    """[B, D, h, w] -> [B*h*w, D]."""
    return z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])


@torch.no_grad()
def restart_dead_codes(model: VQGAN, optimizer: torch.optim.Optimizer, usage: torch.Tensor, z: torch.Tensor,
                       generator: torch.Generator) -> int:
    """Re-seed codes unused since the last restart from current encoder outputs; returns how many."""
    dead = (usage == 0).nonzero().flatten()
    if dead.numel() == 0:
        return 0
    vectors = latent_vectors(z)
    picks = vectors[torch.randint(vectors.shape[0], (dead.numel(),), generator=generator)]
    weight = model.quantize.embedding.weight
    weight[dead] = picks
    state = optimizer.state.get(weight, {})
    for key in ("exp_avg", "exp_avg_sq"):  # stale moments would drag the new code straight back
        if key in state:
            state[key][dead] = 0.0
    return int(dead.numel())


# --------------------------------------------------------------------------------------------
# Optional adversarial loss


class PatchDiscriminator(nn.Module):
    """A small PatchGAN (pix2pix / taming NLayerDiscriminator shape) for the optional GAN loss."""

    def __init__(self, in_channels: int = 3, width: int = 32, layers: int = 2) -> None:
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = width
        for _ in range(1, layers):
            mods += [nn.Conv2d(ch, ch * 2, 4, 2, 1), nn.GroupNorm(8, ch * 2), nn.LeakyReLU(0.2)]
            ch *= 2
        mods += [nn.Conv2d(ch, 1, 3, 1, 1)]
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> patch logits [B, 1, h, w]
        return self.net(x)


# --------------------------------------------------------------------------------------------
# Metrics


@torch.no_grad()
def reconstruction_metrics(model: VQGAN, images: torch.Tensor, batch_size: int = 256) -> dict[str, float]:
    """PSNR (dB, peak 1.0, mean over images), L1, MSE and codebook usage on `images` [N, 3, H, W]."""
    model.eval()
    psnrs, l1s, mses, counts = [], [], [], torch.zeros(model.codebook_size)
    for lo in range(0, images.shape[0], batch_size):
        x = images[lo:lo + batch_size]
        idx = model.encode(x)
        recon = model.decode(idx)
        mse = (recon - x).pow(2).flatten(1).mean(1)
        psnrs.append(10.0 * torch.log10(1.0 / mse.clamp(min=1e-10)))
        l1s.append((recon - x).abs().flatten(1).mean(1))
        mses.append(mse)
        counts += torch.bincount(idx.flatten(), minlength=model.codebook_size).float()
    model.train()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {
        "psnr_db": float(torch.cat(psnrs).mean()),
        "l1": float(torch.cat(l1s).mean()),
        "mse": float(torch.cat(mses).mean()),
        "codes_used": int((counts > 0).sum()),
        "codebook_usage": float((counts > 0).float().mean()),
        "perplexity": float(entropy.exp()),
        "n_images": int(images.shape[0]),
    }


def _stack(dataset: Any, limit: int) -> torch.Tensor:
    if hasattr(dataset, "tensors"):
        return dataset.tensors()[0][:limit]
    return torch.stack([dataset[i][0] for i in range(min(limit, len(dataset)))])


# --------------------------------------------------------------------------------------------
# The loop


def lr_at(step: int, cfg: TokenizerTrainConfig) -> float:
    """Linear warmup (counted from step 1), then half-cycle cosine down to lr * min_lr_ratio."""
    return warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.lr, floor_ratio=cfg.min_lr_ratio, warmup_offset=1)


class TokenizerSteps:
    """The tokenizer's training state and its step, for `training.run_steps`: models, optimizers, the
    batch stream and every RNG. Each metrics.jsonl record holds the values of the step it follows."""

    failure_hint = "lower train.lr"

    def __init__(self, config: TokenizerJobConfig, device: str = "cpu") -> None:
        from mage_bench.data import create_dataset

        self.config, tcfg = config, config.train
        self.device = torch.device(device)
        torch.manual_seed(config.seed)
        self.model = VQGAN(config.tokenizer).to(self.device)
        self.model.quantize.beta = tcfg.commitment_beta
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=tcfg.lr, betas=tcfg.betas, foreach=True)
        self.disc = self.disc_opt = None
        if tcfg.gan_weight > 0:
            self.disc = PatchDiscriminator(config.tokenizer.in_channels).to(self.device)
            self.disc_opt = torch.optim.Adam(self.disc.parameters(), lr=tcfg.disc_lr, betas=(0.5, 0.9),
                                             foreach=True)
        self.train_set = create_dataset(config.data, "train")
        self.stream = BatchStream(self.train_set, tcfg.batch_size, config.seed, config.data.num_workers)
        self.generator = torch.Generator().manual_seed(config.seed + 17)  # k-means and code restarts
        self.usage = torch.zeros(config.tokenizer.n_embed, dtype=torch.long, device=self.device)
        self.batches: Any = None
        self.last: dict[str, Any] = {}  # the latest step's losses, lr and restarts

    def load(self, state: dict[str, Any]) -> tuple[int, float]:
        """Continue from a `state`; returns (step, elapsed seconds)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.disc is not None:
            self.disc.load_state_dict(state["disc"])
            self.disc_opt.load_state_dict(state["disc_optimizer"])
        self.stream.load(state["stream"])
        self.generator.set_state(state["generator"])
        set_rng_state(state["torch_rng"], self.device)
        self.usage = state["usage"].to(self.device)
        return int(state["step"]), float(state["elapsed_s"])

    def state(self, step: int, elapsed: float) -> dict[str, Any]:
        """The checkpoint after `step` steps (train_state.pt: the keys older folders resume from)."""
        disc, disc_opt = self.disc, self.disc_opt
        return {
            "config": to_dict(self.config), "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "disc": disc.state_dict() if disc else None,
            "disc_optimizer": disc_opt.state_dict() if disc_opt else None, "stream": self.stream.state(),
            "generator": self.generator.get_state(), "torch_rng": rng_state(self.device), "usage": self.usage,
            "step": step, "elapsed_s": elapsed,
        }

    def start(self, step: int) -> None:
        """Open the batch stream at `step`; a fresh run first sets the codebook by k-means."""
        self.batches = iter(self.stream)
        if step == 0 and self.config.train.codebook_init == "kmeans":
            with torch.no_grad():  # k-means over the initial encoder's outputs on a few batches
                sample = torch.cat([latent_vectors(self.model._latent(self._next_batch())) for _ in range(4)])
                self.model.quantize.embedding.weight.copy_(kmeans(sample, self.config.tokenizer.n_embed,
                                                                  self.generator))
            self.stream.load({"epoch": 0, "batch": 0})  # those batches are trained on from the start
            self.batches = iter(self.stream)
        self.model.train()

    def _next_batch(self) -> torch.Tensor:
        return next(self.batches).to(self.device, non_blocking=True)

    def train_step(self, step: int) -> None:
        tcfg = self.config.train
        x = self._next_batch()
        if tcfg.hflip:
            flip = (torch.rand(x.shape[0]) < 0.5).to(self.device)  # drawn on the CPU: the same flips on any device
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        lr = lr_at(step, tcfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        recon, vq_loss, indices, z = self.model(x)
        use_gan = self.disc is not None and step >= tcfg.gan_start_step
        losses = self._losses(x, recon, vq_loss, use_gan)
        if not torch.isfinite(losses["loss"]):
            raise TrainingDiverged(f"non-finite tokenizer loss at step {step}")
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        # foreach: bitwise the same as per tensor, fewer ops on the CPU
        nn.utils.clip_grad_norm_(self.model.parameters(), tcfg.grad_clip, foreach=True)
        self.optimizer.step()
        if use_gan:
            self._discriminator_step(x, recon)
        self.usage += torch.bincount(indices.flatten(), minlength=self.usage.numel())
        done, restarted = step + 1, 0
        if tcfg.dead_code_every and done % tcfg.dead_code_every == 0 and done < tcfg.steps:
            restarted = restart_dead_codes(self.model, self.optimizer, self.usage, z, self.generator)
            self.usage.zero_()
        self.last = {**losses, "lr": lr, "codes_restarted": restarted}

    def _losses(self, x: torch.Tensor, recon: torch.Tensor, vq_loss: torch.Tensor,
                use_gan: bool) -> dict[str, torch.Tensor]:
        """The generator side's loss and its terms."""
        tcfg = self.config.train
        l1 = (recon - x).abs().mean()
        l2 = (recon - x).pow(2).mean()
        loss = tcfg.l1_weight * l1 + tcfg.l2_weight * l2 + vq_loss
        gan_g = torch.zeros((), device=x.device)
        if use_gan:
            gan_g = -self.disc(recon).mean()
            loss = loss + tcfg.gan_weight * gan_g
        return {"loss": loss, "l1": l1, "l2": l2, "vq": vq_loss, "gan_g": gan_g}

    def _discriminator_step(self, x: torch.Tensor, recon: torch.Tensor) -> None:
        """One hinge-loss step of the patch discriminator, real `x` against the detached `recon`."""
        d_loss = F.relu(1 - self.disc(x)).mean() + F.relu(1 + self.disc(recon.detach())).mean()
        self.disc_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        self.disc_opt.step()

    def log_record(self, step: int, time_s: float) -> dict[str, Any]:
        last = self.last
        psnr = float(10 * torch.log10(1.0 / last["l2"].detach().clamp(min=1e-10)))
        return {"step": step, "epoch": self.stream.epoch,
                **{key: float(last[key].detach()) for key in ("loss", "l1", "l2", "vq", "gan_g")},
                "lr": last["lr"], "batch_psnr_db": psnr, "codes_restarted": last["codes_restarted"],
                "time_s": time_s}

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        return {"loss": f"{record['loss']:.4f}", "psnr": f"{record['batch_psnr_db']:.1f}"}


def train_tokenizer(config: TokenizerJobConfig, out_dir: str | Path, resume: bool = False,
                    progress: bool = True, stop_at: int | None = None, device: str = "auto") -> dict[str, Any]:
    """Train (or resume) a tokenizer into `out_dir`; returns its card. `stop_at` simulates an interruption
    (the state is saved there and {"interrupted_at": step} returned). `device`: auto (a GPU when one is
    visible: the cifar10 preset's 20k steps would take hours on a CPU) | cpu | cuda. The weights and the
    card's reconstruction metrics are computed on the CPU copy, so the folder is the same wherever it trained."""
    from mage_bench.runs import resolve_device

    out = Path(out_dir)
    check_output_folder(out, out / STATE_FILE, resume, "a folder such as models/NAME", "a training state")
    if resume and (out / CARD_FILE).exists():
        card = json.loads((out / CARD_FILE).read_text())
        if card.get("config") != to_dict(config):
            raise UserError(f"{out} holds a finished tokenizer trained with another config; choose another --out")
        return card  # finished already: resuming is a no-op, so the same command can be rerun
    torch.set_flush_denormal(True)  # denormals slow small conv nets on CPU several-fold
    tcfg = config.train
    steps = TokenizerSteps(config, resolve_device(device))
    folder = TrainingFolder(out, STATE_FILE)
    step, elapsed = folder.begin(config, resume, steps.load)
    steps.start(step)
    cadence = Cadence(tcfg.steps, tcfg.log_every, tcfg.checkpoint_every)
    step, elapsed = run_steps(steps, folder, cadence, (step, elapsed), stop_at, progress, "tokenizer")
    if step < tcfg.steps:  # interrupted on purpose (tests): leave the resumable state only
        return {"interrupted_at": step}
    return _finish(config, out, steps.model.cpu(), steps.train_set, elapsed)


def _finish(config: TokenizerJobConfig, out: Path, model: VQGAN, train_set: Any, elapsed: float) -> dict[str, Any]:
    """Measure the trained tokenizer, save its weights and write its card (returned)."""
    from mage_bench.data import create_dataset

    test_set = create_dataset(config.data, "test", train_transform=False)
    eval_train = create_dataset(config.data, "train", train_transform=False)
    test_metrics = reconstruction_metrics(model, _stack(test_set, config.train.eval_images))
    train_metrics = reconstruction_metrics(model, _stack(eval_train, config.train.eval_images))
    atomic_torch_save(tokenizer_payload(model), out / WEIGHTS_FILE)
    files = {"tokenizer": WEIGHTS_FILE}
    details = {
        "token_grid": [config.tokenizer.token_grid, config.tokenizer.token_grid],
        "codebook_size": config.tokenizer.n_embed,
        "data": {"name": config.data.name, "image_size": config.data.image_size, "train_images": len(train_set),
                 "description": getattr(train_set, "description", config.data.name)},
        "steps": config.train.steps,
        "train_time_s": round(elapsed, 1),
        "metrics": {"test": test_metrics, "train": train_metrics},
        "git_commit": git_commit(),
        "versions": package_versions(),
    }
    # `config` is the whole job config: `tokenizer_config_at` reads card["config"]["tokenizer"]
    card = ModelCard(kind="tokenizer", name=out.name, architecture=config.tokenizer.name, config=to_dict(config),
                     files=files, sha256=describe_files(out, files),
                     origin="trained by mage-bench tokenizer train", details=details)
    return write_card(out, card)
