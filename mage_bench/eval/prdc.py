"""Precision, recall, density and coverage of generated features against real ones.

Precision and recall are Kynkäänniemi et al. 2019 ("Improved precision and recall"): a generated sample is
precise when it lies inside some real sample's k-nearest-neighbour ball (radius: the distance to that real
sample's k-th nearest real neighbour), and a real sample is recalled when it lies inside some generated
sample's ball. Density and coverage are Naeem et al. 2020: density counts, per generated sample, the real
balls it lies in (divided by k, averaged), coverage is the share of real samples whose ball holds at least one
generated sample. The definitions are those of the authors' `prdc` package (strict `<`, the k-th neighbour
not counting the sample itself); tests/test_prdc_cmmd.py checks the numbers against it.

The papers' settings: k = 3 for precision/recall, k = 5 for density/coverage; `prdc_at` computes several k
from one pass over the distances. Distances are computed in float64 in row blocks of bounded memory, so 50k x
50k features never hold a full distance matrix.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from mage_bench.eval import row_blocks

# Elements of one block of distances (float64): 2**25 is 256 MB.
BLOCK_ELEMENTS = 2**25


def _as_tensor(features: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(features).to(torch.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be a [N, D] array with N >= 2, got shape {tuple(x.shape)}")
    return x


def nearest_neighbour_radii(features: torch.Tensor, ks: Iterable[int]) -> dict[int, torch.Tensor]:
    """{k: float64[N]}, each sample's distance to its k-th nearest other sample of the same set."""
    ks = sorted(set(ks))
    n = features.shape[0]
    if ks[0] < 1 or ks[-1] >= n:
        raise ValueError(f"nearest_k must be in [1, {n - 1}] for {n} samples, got {ks}")
    radii = {k: torch.empty(n, dtype=torch.float64) for k in ks}
    for rows in row_blocks(n, n, BLOCK_ELEMENTS):
        # k + 1 smallest: the sample itself is its own nearest neighbour, at distance 0.
        smallest = torch.cdist(features[rows], features).topk(ks[-1] + 1, dim=1, largest=False).values
        for k in ks:
            radii[k][rows] = smallest[:, k]
    return radii


def prdc_per_sample(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor,
                    ks: Iterable[int]) -> dict[int, dict[str, torch.Tensor]]:
    """{k: per-sample terms}: "precision" bool [M] (generated sample inside some real ball), "density" float64 [M]
    (real balls around it, / k), "recall" bool [N] (real sample inside some generated ball), "coverage" bool [N]
    (its ball holds a generated sample). Each metric is the mean of its terms (`prdc_at`); with the balls held
    fixed, resampling the terms gives sample-level bootstrap intervals without re-deriving radii from resampled
    sets (duplicates would shrink the k-NN radii)."""
    real_x, fake_x = _as_tensor(real), _as_tensor(fake)
    if real_x.shape[1] != fake_x.shape[1]:
        raise ValueError(f"real and generated features differ in width: {real_x.shape[1]} vs {fake_x.shape[1]}")
    ks = sorted(set(ks))
    real_radii, fake_radii = nearest_neighbour_radii(real_x, ks), nearest_neighbour_radii(fake_x, ks)
    m = fake_x.shape[0]
    precise = {k: torch.zeros(m, dtype=torch.bool) for k in ks}  # per generated sample: inside a real ball
    in_balls = {k: torch.zeros(m, dtype=torch.float64) for k in ks}  # per generated sample: real balls around it
    recalled = {k: [] for k in ks}  # per real sample: inside a generated ball
    covered = {k: [] for k in ks}  # per real sample: its ball holds a generated sample
    for rows in row_blocks(real_x.shape[0], m, BLOCK_ELEMENTS):
        distances = torch.cdist(real_x[rows], fake_x)  # [rows, M]
        nearest_fake = distances.min(dim=1).values
        for k in ks:
            inside = distances < real_radii[k][rows, None]
            precise[k] |= inside.any(dim=0)
            in_balls[k] += inside.sum(dim=0, dtype=torch.float64)
            recalled[k].append((distances < fake_radii[k][None, :]).any(dim=1))
            covered[k].append(nearest_fake < real_radii[k][rows])
    return {k: {"precision": precise[k], "density": in_balls[k] / k, "recall": torch.cat(recalled[k]),
                "coverage": torch.cat(covered[k])} for k in ks}


def prdc_at(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor,
            ks: Iterable[int]) -> dict[int, dict[str, float]]:
    """{k: {"precision", "recall", "density", "coverage"}} for each nearest-neighbour count k."""
    terms = prdc_per_sample(real, fake, ks)
    return {k: {name: terms[k][name].double().mean().item() for name in ("precision", "recall", "density",
                                                                         "coverage")} for k in terms}


def prdc(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, nearest_k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage at one k (the `prdc` package's `compute_prdc`)."""
    return prdc_at(real, fake, [nearest_k])[nearest_k]
