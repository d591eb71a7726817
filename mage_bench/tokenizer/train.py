"""Training a small VQGAN tokenizer on the user's own data (the official code has none).

Loss: L1 + L2 reconstruction + codebook/commitment terms, optionally a patch-GAN hinge loss.
The codebook is kept alive with k-means initialisation from the first encoder outputs and
restarts of codes unused over a window (re-seeded from current encoder outputs).

Resume is exact for in-memory data sets (digits): the checkpoint holds the model, optimizers,
the data position and every RNG state, so N steps straight == N/2 + resume N/2, bitwise.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from mage_bench.config import TokenizerJobConfig, dump_yaml, require_same_config, to_dict
from mage_bench.errors import UserError
from mage_bench.io import (
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    check_output_folder,
    git_commit,
    package_versions,
    rewind_jsonl,
    safe_torch_load,
    sha256_file,
    utc_now,
)
from mage_bench.tokenizer import CARD_FILE, WEIGHTS_FILE, tokenizer_payload
from mage_bench.tokenizer.vqgan import VQGAN

STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"


class TrainingDiverged(RuntimeError):
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


def lr_at(step: int, cfg) -> float:
    """Linear warmup, then half-cycle cosine down to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_tokenizer(config: TokenizerJobConfig, out_dir: str | Path, resume: bool = False,
                    progress: bool = True, stop_at: int | None = None) -> dict[str, Any]:
    """Train (or resume) a tokenizer into `out_dir`; returns its card. `stop_at` simulates an interruption."""
    from tqdm import tqdm

    from mage_bench.data import create_dataset

    out = Path(out_dir)
    state_path = out / STATE_FILE
    check_output_folder(out, state_path, resume, "a folder such as models/NAME", "a training state")
    if resume and (out / CARD_FILE).exists():
        card = json.loads((out / CARD_FILE).read_text())
        if card.get("config") != to_dict(config):
            raise UserError(f"{out} holds a finished tokenizer trained with another config; choose another --out")
        return card  # finished already: resuming is a no-op, so the same command can be rerun
    torch.set_flush_denormal(True)  # denormals slow small conv nets on CPU several-fold
    tcfg = config.train

    torch.manual_seed(config.seed)
    model = VQGAN(config.tokenizer)
    model.quantize.beta = tcfg.commitment_beta
    optimizer = torch.optim.Adam(model.parameters(), lr=tcfg.lr, betas=tcfg.betas)
    disc = disc_opt = None
    if tcfg.gan_weight > 0:
        disc = PatchDiscriminator(config.tokenizer.in_channels)
        disc_opt = torch.optim.Adam(disc.parameters(), lr=tcfg.disc_lr, betas=(0.5, 0.9))
    train_set = create_dataset(config.data, "train")
    stream = BatchStream(train_set, tcfg.batch_size, config.seed, config.data.num_workers)
    generator = torch.Generator().manual_seed(config.seed + 17)  # k-means and code restarts
    usage = torch.zeros(config.tokenizer.n_embed, dtype=torch.long)
    step, elapsed = 0, 0.0

    if resume and state_path.exists():
        state = safe_torch_load(state_path)
        require_same_config(state["config"], config, str(out))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if disc is not None:
            disc.load_state_dict(state["disc"])
            disc_opt.load_state_dict(state["disc_optimizer"])
        stream.load(state["stream"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        usage = state["usage"]
        step, elapsed = int(state["step"]), float(state["elapsed_s"])
        rewind_jsonl(out / METRICS_FILE, step)
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / CONFIG_FILE, dump_yaml(config))
        if (out / METRICS_FILE).exists():
            (out / METRICS_FILE).unlink()

    def save_state() -> None:
        atomic_torch_save({
            "config": to_dict(config), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "disc": disc.state_dict() if disc else None, "disc_optimizer": disc_opt.state_dict() if disc_opt else None,
            "stream": stream.state(), "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
            "usage": usage, "step": step, "elapsed_s": elapsed,
        }, state_path)

    batches = iter(stream)
    if step == 0 and tcfg.codebook_init == "kmeans":
        with torch.no_grad():  # k-means over the initial encoder's outputs on a few batches
            sample = torch.cat([latent_vectors(model._latent(next(batches))) for _ in range(4)])
            model.quantize.embedding.weight.copy_(kmeans(sample, config.tokenizer.n_embed, generator))
        stream.load({"epoch": 0, "batch": 0})
        batches = iter(stream)

    bar = tqdm(total=tcfg.steps, initial=step, desc="tokenizer", unit="step", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    model.train()
    tic = time.perf_counter()
    with open(out / METRICS_FILE, "a") as log:
        while step < tcfg.steps:
            if stop_at is not None and step >= stop_at:
                break
            x = next(batches)
            if tcfg.hflip:
                flip = torch.rand(x.shape[0]) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(3), x)
            lr = lr_at(step, tcfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            recon, vq_loss, indices, z = model(x)
            l1 = (recon - x).abs().mean()
            l2 = (recon - x).pow(2).mean()
            loss = tcfg.l1_weight * l1 + tcfg.l2_weight * l2 + vq_loss
            gan_g = torch.zeros(())
            use_gan = disc is not None and step >= tcfg.gan_start_step
            if use_gan:
                gan_g = -disc(recon).mean()
                loss = loss + tcfg.gan_weight * gan_g
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"non-finite tokenizer loss at step {step}; the last good checkpoint is "
                                       f"{state_path if state_path.exists() else 'not written yet'}; lower train.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            optimizer.step()
            if use_gan:
                d_loss = F.relu(1 - disc(x)).mean() + F.relu(1 + disc(recon.detach())).mean()
                disc_opt.zero_grad(set_to_none=True)
                d_loss.backward()
                disc_opt.step()
            usage += torch.bincount(indices.flatten(), minlength=usage.numel())
            step += 1
            restarted = 0
            if tcfg.dead_code_every and step % tcfg.dead_code_every == 0 and step < tcfg.steps:
                restarted = restart_dead_codes(model, optimizer, usage, z, generator)
                usage.zero_()
            bar.update(1)
            if step % tcfg.log_every == 0 or step == tcfg.steps:
                psnr = float(10 * torch.log10(1.0 / l2.detach().clamp(min=1e-10)))
                record = {"step": step, "epoch": stream.epoch, "loss": float(loss.detach()), "l1": float(l1.detach()),
                          "l2": float(l2.detach()), "vq": float(vq_loss.detach()), "gan_g": float(gan_g.detach()), "lr": lr,
                          "batch_psnr_db": psnr, "codes_restarted": restarted,
                          "time_s": elapsed + time.perf_counter() - tic}
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}", psnr=f"{psnr:.1f}")
            if step % tcfg.checkpoint_every == 0 or step == tcfg.steps:
                elapsed += time.perf_counter() - tic
                tic = time.perf_counter()
                save_state()
    bar.close()
    if step < tcfg.steps:  # interrupted on purpose (tests): leave the resumable state only
        elapsed += time.perf_counter() - tic
        save_state()
        return {"interrupted_at": step}
    return _finish(config, out, model, train_set, elapsed)


def _finish(config: TokenizerJobConfig, out: Path, model: VQGAN, train_set: Any, elapsed: float) -> dict[str, Any]:
    from mage_bench.data import create_dataset

    test_set = create_dataset(config.data, "test", train_transform=False)
    eval_train = create_dataset(config.data, "train", train_transform=False)
    test_metrics = reconstruction_metrics(model, _stack(test_set, config.train.eval_images))
    train_metrics = reconstruction_metrics(model, _stack(eval_train, config.train.eval_images))
    atomic_torch_save(tokenizer_payload(model), out / WEIGHTS_FILE)
    card = {
        "kind": "tokenizer",
        "name": out.name,
        "architecture": config.tokenizer.name,
        "token_grid": [config.tokenizer.token_grid, config.tokenizer.token_grid],
        "codebook_size": config.tokenizer.n_embed,
        "data": {"name": config.data.name, "image_size": config.data.image_size, "train_images": len(train_set),
                 "description": getattr(train_set, "description", config.data.name)},
        "steps": config.train.steps,
        "train_time_s": round(elapsed, 1),
        "metrics": {"test": test_metrics, "train": train_metrics},
        "config": to_dict(config),
        "weights_file": WEIGHTS_FILE,
        "sha256": sha256_file(out / WEIGHTS_FILE),
        "origin": "trained by mage-bench tokenizer train",
        "git_commit": git_commit(),
        "versions": package_versions(),
        "created_at": utc_now(),
    }
    atomic_write_json(out / CARD_FILE, card)
    return card
