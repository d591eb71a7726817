"""The learning-rate schedule every trainer uses: linear warmup, then a half-cycle cosine.

One function for MAGE training (per optimizer step, from 0, down to `train.min_lr`), the VQGAN
tokenizer (per step, warmup counted from step 1, down to `lr * min_lr_ratio`) and the paper's
linear-probe head (per iteration, in fractional epochs, down to 0).
"""

from __future__ import annotations

import math


def warmup_cosine(t: float, total: float, warmup: float, peak: float, floor_ratio: float = 0.0,
                  warmup_offset: float = 0, angle_first: bool = False) -> float:
    """The lr at time `t` (steps or fractional epochs) of a schedule `total` long.

    While `t < warmup`: `peak * (t + warmup_offset) / warmup` (offset 0 starts from zero, as the
    official MAGE code; the tokenizer uses 1). Then a half-cycle cosine from `peak` down to
    `peak * floor_ratio` at `t = total`.

    `angle_first` says how the cosine's angle is rounded: False computes the decayed fraction first,
    `pi * ((t - warmup) / span)` (the trainers), True the angle first, `pi * (t - warmup) / span` (the
    linear-probe head). The two are equal in exact arithmetic but differ in the last bit for about a
    quarter of the steps, and every recorded number downstream depends on them, so each caller keeps
    its own order.
    """
    if t < warmup:
        return peak * (t + warmup_offset) / warmup
    span = max(total - warmup, 1)
    angle = math.pi * (t - warmup) / span if angle_first else math.pi * ((t - warmup) / span)
    return peak * (floor_ratio + (1 - floor_ratio) * 0.5 * (1 + math.cos(angle)))
