"""MAGE-C: a SimCLR-style contrastive loss on the MAGE encoder.

The official repository never released MAGE-C. What we implement, and why:
- Two augmented views of each image are tokenized; each view gets its own random token order, the
  same masking ratio and the same drop count (so both encoder passes have one fixed length).
- The reconstruction loss is computed on the first view only, exactly as in plain MAGE, so that
  sweeping the contrastive weight changes one thing: the added contrastive term.
- Feature: the encoder output of the masked view, average-pooled over the token positions (the
  class token excluded, as in the linear probe), through a 2-layer MLP (Linear, ReLU, Linear: the
  SimCLR v1 head; no BatchNorm, so the loss does not depend on how the batch is split across
  processes).
- Loss: NT-Xent / InfoNCE over the 2N projections with in-batch negatives and a temperature; under
  torch.distributed the projections of every process are gathered (with gradients), so 2 processes
  with batch B compute the same loss as one process with batch 2B.
- Total loss = reconstruction + contrastive_weight * contrastive; weight 0 skips the second view.
Defaults (weight 0.1 when enabled in sweeps, temperature 0.2) are common choices, not paper-verified.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class ProjectionHead(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, out)
        return self.fc2(F.relu(self.fc1(x)))


def pool_encoder_output(latent: torch.Tensor) -> torch.Tensor:
    """(B, 1 + K, D) encoder output -> (B, D): mean over the token positions, class token excluded."""
    return latent[:, 1:].mean(dim=1)


def _gather_with_grad(z: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All processes' rows in rank order, and where this process's rows start."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z, 0
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(z)
    return torch.cat(parts, dim=0), dist.get_rank() * z.shape[0]


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent: each projection's positive is its other view; every other projection is a negative.

    z1, z2: (B, d) this process's projections of the two views. Returns the mean over this
    process's 2B rows; DDP's gradient averaging then gives the mean over all rows of all processes.
    """
    # The similarities in fp32 with autocast off: under autocast the matmul would run in bf16/fp16
    # whatever its inputs' dtype, and exp(s / 0.2) magnifies rounding.
    with torch.autocast(device_type=z1.device.type, enabled=False):
        return _info_nce_fp32(z1.float(), z2.float(), temperature)


def _info_nce_fp32(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    local = z1.shape[0]
    z1, offset = _gather_with_grad(F.normalize(z1.float(), dim=1))
    z2, _ = _gather_with_grad(F.normalize(z2.float(), dim=1))
    n = z1.shape[0]
    z = torch.cat([z1, z2], dim=0)  # (2N, d)
    logits = (z @ z.t() / temperature).fill_diagonal_(float("-inf"))  # a projection is not its own negative
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    per_row = F.cross_entropy(logits, targets, reduction="none").view(2, n)  # (2, N)
    return per_row[:, offset:offset + local].mean()
