"""CMMD (Jayasumana et al. 2024, "Rethinking FID"): the maximum mean discrepancy between two embedding sets
under a Gaussian RBF kernel, exp(-||x - y||^2 / (2 sigma^2)) with sigma = 10, times 1000.

The estimator is the published code's: the mean over *all* entries of each kernel matrix, diagonals included
(the biased, minimum-variance form), k_xx + k_yy - 2 k_xy. The paper embeds images with CLIP ViT-L/14 at 336 px
and L2-normalises the embeddings; that belongs to the extractor, this function takes the features as given.
The kernel sums run in float64 over row blocks of bounded memory (50k x 50k never held at once).
tests/test_prdc_cmmd.py checks it against a NumPy transcription of the published formula.
"""

from __future__ import annotations

import numpy as np
import torch

from mage_bench.eval import row_blocks

SIGMA = 10.0
SCALE = 1000.0
BLOCK_ELEMENTS = 2**25  # float64 kernel entries per block: 256 MB


def _kernel_mean(x: torch.Tensor, y: torch.Tensor, gamma: float) -> float:
    """Mean of exp(-gamma ||x_i - y_j||^2) over every (i, j)."""
    total = 0.0
    y_norms = (y * y).sum(dim=1)
    for rows in row_blocks(x.shape[0], y.shape[0], BLOCK_ELEMENTS):
        block = x[rows]
        # ||x||^2 - 2 x.y + ||y||^2, as the published code expands it (not clamped: the same numbers).
        squared = (block * block).sum(dim=1)[:, None] - 2 * block @ y.T + y_norms[None, :]
        total += torch.exp(-gamma * squared).sum().item()
    return total / (x.shape[0] * y.shape[0])


def cmmd(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, sigma: float = SIGMA,
         scale: float = SCALE) -> float:
    """CMMD between two [N, D] embedding sets (N may differ), scaled as published (x 1000)."""
    x = torch.as_tensor(real).to(torch.float64)
    y = torch.as_tensor(fake).to(torch.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(x.shape[0], y.shape[0]) < 1:
        raise ValueError(f"cmmd needs two [N, D] embedding sets of one width, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    gamma = 1.0 / (2.0 * sigma**2)
    return scale * (_kernel_mean(x, x, gamma) + _kernel_mean(y, y, gamma) - 2.0 * _kernel_mean(x, y, gamma))


def _weighted_kernel_mean(x: torch.Tensor, y: torch.Tensor, wx: torch.Tensor, wy: torch.Tensor,
                          gamma: float) -> torch.Tensor:
    """[B]: for each row b of the weights, sum_ij wx[b,i] k(x_i, y_j) wy[b,j] / (sum wx[b] * sum wy[b])."""
    total = torch.zeros(wx.shape[0], dtype=torch.float64)
    y_norms = (y * y).sum(dim=1)
    for rows in row_blocks(x.shape[0], y.shape[0], BLOCK_ELEMENTS):
        block = x[rows]
        kernel = torch.exp(-gamma * ((block * block).sum(dim=1)[:, None] - 2 * block @ y.T + y_norms[None, :]))
        total += ((wx[:, rows] @ kernel) * wy).sum(dim=1)
    return total / (wx.sum(dim=1) * wy.sum(dim=1))


def cmmd_resampled(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, real_counts: np.ndarray,
                   fake_counts: np.ndarray, sigma: float = SIGMA, scale: float = SCALE) -> np.ndarray:
    """CMMD of B bootstrap resamples at once: `real_counts` [B, N] and `fake_counts` [B, M] say how often each
    embedding was drawn. Equal to `cmmd` of the resampled sets (its means over all kernel entries are these
    count-weighted means), at the cost of one pass over each kernel matrix for all B resamples."""
    x = torch.as_tensor(np.asarray(real)).to(torch.float64)
    y = torch.as_tensor(np.asarray(fake)).to(torch.float64)
    wx = torch.as_tensor(real_counts, dtype=torch.float64)
    wy = torch.as_tensor(fake_counts, dtype=torch.float64)
    gamma = 1.0 / (2.0 * sigma**2)
    values = (_weighted_kernel_mean(x, x, wx, wx, gamma) + _weighted_kernel_mean(y, y, wy, wy, gamma)
              - 2.0 * _weighted_kernel_mean(x, y, wx, wy, gamma))
    return (scale * values).numpy()
