"""Iterative (MaskGIT-style) decoding, as in the official gen_img_uncond.py, seeded per image; from
all-[MASK] (generation) or from a partly known token grid (inpainting: `complete_tokens`).

Each image i owns a generator seeded from (seed, i) that supplies, for every step, one uniform per
position for sampling (inverse CDF of the softmax) and one for the Gumbel noise of the confidence.
So an image does not depend on the batch it was decoded in, nor on how many images are made.

Per step t of T (official): sample every unknown position from softmax(logits[:, 1:, :K]);
ratio = (t + 1) / T; mask_len = floor(L * cos(pi/2 * ratio)) clamped to [1, unknown - 1] (inpainting:
L is the row's count of unknown tokens at the start, as the maintainer's recipe, LTH14/mage#49);
confidence = log p(sampled) + temperature * (1 - ratio) * Gumbel (known positions: +inf);
re-mask the mask_len least confident. The result is the last step's sampled tokens (all positions).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch


def image_generator(seed: int, index: int) -> torch.Generator:
    """The generator of image `index` under `seed` (independent streams via NumPy's SeedSequence)."""
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def decoding_noise(seed: int, indices: Sequence[int], steps: int, num_tokens: int) -> torch.Tensor:
    """float64[2, B, steps, L] uniforms in (0, 1): [0] for sampling, [1] for Gumbel noise."""
    per_image = [torch.rand(2, steps, num_tokens, generator=image_generator(seed, i), dtype=torch.float64)
                 for i in indices]
    return torch.stack(per_image, dim=1).clamp_(1e-12, 1 - 1e-12)


def _sample_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs (B, L, K), u (B, L) -> long (B, L): the first code whose CDF exceeds u * total."""
    cdf = probs.double().cumsum(dim=-1)
    target = (u * cdf[..., -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


@torch.no_grad()
def iterative_decode(model, noise: torch.Tensor, steps: int, temperature: float) -> torch.Tensor:
    """Decode B images from all-[MASK]: noise from `decoding_noise` -> tokens long[B, L]."""
    _, B, _, L = noise.shape
    device = next(model.parameters()).device
    tokens = torch.zeros(B, L, dtype=torch.long, device=device)  # values under `unknown` are ignored
    return complete_tokens(model, tokens, torch.ones(B, L, dtype=torch.bool, device=device), noise, steps,
                           temperature)


def schedule_lengths(unknown_at_start: list[int], unknown_now: list[int], step: int, steps: int) -> list[int]:
    """Per row, how many positions stay unknown after `step`: the official cosine schedule over the row's
    own count of unknown tokens at the start, floor(U0 * cos(pi/2 * (step + 1) / steps)), at least 1 and at
    most (unknown now - 1) so every step fixes one; 0 for a row with nothing unknown (its known tokens are
    never re-masked)."""
    ratio = (step + 1) / steps
    return [0 if now == 0 else max(1, min(now - 1, math.floor(start * math.cos(math.pi / 2 * ratio))))
            for start, now in zip(unknown_at_start, unknown_now, strict=True)]


@torch.no_grad()
def complete_tokens(model, tokens: torch.Tensor, unknown: torch.Tensor, noise: torch.Tensor, steps: int,
                    temperature: float, argmax: bool = False) -> torch.Tensor:
    """Iterative decoding from a partly known token grid (inpainting; all unknown: generation).

    tokens long[B, L] (values at `unknown` positions are ignored), unknown bool[B, L] (rows may differ in
    how many), noise from `decoding_noise`. Known positions are never masked again, so they come back
    unchanged; the unknown ones follow the cosine schedule over their own count (`schedule_lengths`).
    argmax: each step takes the most likely code instead of sampling it (the Gumbel re-masking noise,
    scaled by `temperature`, still applies). Returns long[B, L].
    """
    _, B, _, L = noise.shape
    K = model.codebook_size
    device = next(model.parameters()).device
    noise = noise.to(device)
    tokens, unknown = tokens.to(device), unknown.to(device)
    counts = unknown.sum(dim=1).tolist()  # one host read; afterwards the counts follow from the schedule
    unknown_at_start = list(counts)
    no_drop = torch.zeros_like(unknown)
    sampled = tokens
    for step in range(steps):
        logits = model(tokens, unknown, no_drop)[:, 1:, :K].float()  # (B, L, K)
        probs = torch.softmax(logits, dim=-1)
        choice = probs.argmax(dim=-1) if argmax else _sample_inverse_cdf(probs, noise[0, :, step])
        sampled = torch.where(unknown, choice, tokens)
        ratio = (step + 1) / steps
        counts = schedule_lengths(unknown_at_start, counts, step, steps)
        mask_len = torch.tensor(counts, device=device)[:, None]
        chosen = probs.gather(-1, sampled[..., None]).squeeze(-1).double()  # (B, L)
        gumbel = -torch.log(-torch.log(noise[1, :, step]))
        confidence = torch.log(chosen) + temperature * (1 - ratio) * gumbel
        # A diverged model's NaN would sort after +inf and let a known token be masked: NaN counts as least sure.
        confidence = torch.where(confidence.isnan(), -math.inf, confidence)
        confidence = torch.where(unknown, confidence, torch.full_like(confidence, math.inf))
        rank = confidence.argsort(dim=1, stable=True).argsort(dim=1)
        unknown = rank < mask_len  # the least confident are masked again; known ones (+inf) never are
        tokens = torch.where(unknown, torch.zeros_like(sampled), sampled)
    return sampled


def batched(indices: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    for lo in range(0, len(indices), batch_size):
        yield list(indices[lo:lo + batch_size])
