"""The MAGE(-C) training objective: the reconstruction loss, plus MAGE-C's contrastive term.

One module holds the model and MAGE-C's projection head, so DDP sees every trainable parameter in one
forward. It takes plain settings (not a run config), so it can be built without the training code.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mage_bench.mage.contrastive import ProjectionHead, info_nce, pool_encoder_output
from mage_bench.mage.model import MAGE, mage_loss


class MageObjective(nn.Module):
    """`forward(tokens, mask, drop, second)` -> {"loss", "loss_recon"} (and "loss_contrastive" for MAGE-C).

    MAGE: the label-smoothed reconstruction loss of the masked tokens (`mage_loss`). MAGE-C
    (`contrastive_weight > 0`): plus `contrastive_weight` times InfoNCE between the pooled encoder
    outputs of the two views, each through a projection head (`proj_hidden_dim` wide, None: the encoder
    width; `proj_dim` out). The settings' defaults live in the run config (`train`, `contrastive`).
    `n_drop`: the tokens every row drops, when fixed (training: by `masking.mask_ratio_min`), so the
    encoder knows its length without reading it from the drop mask (a host sync per view).
    """

    def __init__(self, model: MAGE, *, label_smoothing: float, contrastive_weight: float, temperature: float,
                 proj_hidden_dim: int | None, proj_dim: int, n_drop: int | None = None) -> None:
        super().__init__()
        self.model = model  # registered before the head: the optimizer's parameter order depends on it
        self.n_drop = n_drop
        self.label_smoothing = label_smoothing
        self.contrastive_weight, self.temperature = contrastive_weight, temperature
        dim = model.config.embed_dim
        self.head = ProjectionHead(dim, proj_hidden_dim or dim, proj_dim) if contrastive_weight > 0 else None

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor,
                second: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """tokens long[B, L], mask/drop bool[B, L]; `second`: MAGE-C's other view as (tokens, mask, drop)."""
        logits, latent = self.model.forward_with_latent(tokens, mask, drop, self.n_drop)
        recon = mage_loss(logits, tokens, mask, self.model.codebook_size, self.label_smoothing)
        out = {"loss": recon, "loss_recon": recon}
        if self.head is not None and second is not None:
            latent2 = self.model.encode_masked(*second, n_drop=self.n_drop)
            con = info_nce(self.head(pool_encoder_output(latent)), self.head(pool_encoder_output(latent2)),
                           self.temperature)
            out["loss"] = recon + self.contrastive_weight * con
            out["loss_contrastive"] = con
        return out
