"""The MAGE encoder/decoder on VQGAN tokens, faithful to the official models_mage.py.

forward(tokens, mask, drop) runs four named stages:
  embed_tokens   -> [MASK] ids on masked positions, the fake class token in front, BERT embedding
  forward_encoder-> dropped positions removed (every row drops the same number), ViT blocks, norm
  forward_decoder-> every position filled with the encoder's class output, kept tokens scattered
                    back, learned positions, ViT blocks, norm, MlmLayer tied (detached) to the
                    word embeddings -> logits [B, 1 + L, vocab]
and `mage_loss` scores logits[:, 1:, :codebook_size] on all masked positions. `forward_with_latent`
also returns the encoder output, which MAGE-C's objective (`mage.objective`) pools.

The masking distribution is not in here: callers pass `mask` and `drop` (see mage.masking).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mage_bench.mage.presets import ModelConfig


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.attn_dropout = dropout
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, nh, N, hd) each
        # The official attention under fp16 autocast: q @ k^T of the half-precision q, k upcast to fp32, the softmax
        # in fp32, the probabilities times v in half precision. SDPA given the half-precision q, k, v does the same
        # up to summation order: its fused kernels (flash attention on GPUs) accumulate q @ k^T and run the
        # softmax in fp32, then multiply half-precision probabilities by v; upcasting q, k, v first would only rule
        # flash attention out (it takes 16-bit inputs). In fp32 (CPU) this is plain fp32 attention.
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    """timm 0.3.2's Mlp (fc1, GELU, dropout, fc2, dropout): the official key names."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth (timm's `drop_path`): zero a residual branch per sample with probability `rate`
    in training, scaling the kept ones by 1 / (1 - rate). The identity when rate is 0 or in eval mode."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - rate)
    return x * keep / (1 - rate)


class Block(nn.Module):
    """Pre-norm ViT block (LayerNorm eps 1e-6, qkv bias). `drop_path_rate` (stochastic depth) is 0 in
    pre-training, as the official MAGE; fine-tuning sets it (`MAGE.set_drop_path`)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)
        self.drop_path_rate = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class BertEmbeddings(nn.Module):
    """Word + learned position embedding, LayerNorm, dropout (official key names, incl. position_ids)."""

    def __init__(self, vocab_size: int, dim: int, max_positions: int, dropout: float) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, dim)
        self.position_embeddings = nn.Embedding(max_positions, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("position_ids", torch.arange(max_positions).expand((1, -1)).clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, N) -> (B, N, D)
        positions = self.position_embeddings(self.position_ids[:, : ids.shape[1]])
        return self.dropout(self.LayerNorm(self.word_embeddings(ids) + positions))


class MlmLayer(nn.Module):
    def __init__(self, decoder_dim: int, word_dim: int, vocab_size: int) -> None:
        super().__init__()
        self.fc = nn.Linear(decoder_dim, word_dim)
        self.ln = nn.LayerNorm(word_dim)  # default eps 1e-5, as officially
        self.bias = nn.Parameter(torch.zeros(1, 1, vocab_size))

    def forward(self, x: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        hidden = self.ln(F.gelu(self.fc(x)))
        # The logits of a vocab-wide softmax in fp32, autocast off: the official matmul runs under fp16
        # autocast (10 mantissa bits); under bf16 (7 bits) they would be coarser than the official ones.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return hidden.float() @ word_embeddings.float().t() + self.bias.float()  # (B, N, vocab)


def _mean_pool(x: torch.Tensor) -> torch.Tensor:
    """Mean of tokens 1..L, then a parameter-free LayerNorm (the official probe's pooling)."""
    return F.layer_norm(x[:, 1:].mean(dim=1), (x.shape[-1],), eps=1e-6)


def _cls_pool(x: torch.Tensor) -> torch.Tensor:
    """The class token's output, through the same parameter-free LayerNorm."""
    return F.layer_norm(x[:, 0], (x.shape[-1],), eps=1e-6)


# How a block's tokens become one probe feature. "mean+cls" concatenates both (DINOv2's linear evaluation
# joins the class token and the average-pooled patch tokens the same way).
POOLINGS = {"mean": _mean_pool, "cls": _cls_pool,
            "mean+cls": lambda x: torch.cat([_mean_pool(x), _cls_pool(x)], dim=1)}


class MAGE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        L, D, Dd = cfg.num_tokens, cfg.embed_dim, cfg.decoder_embed_dim
        self.codebook_size = cfg.codebook_size
        self.fake_class_label = cfg.codebook_size + cfg.fake_class_offset
        self.mask_token_label = cfg.vocab_size - 1
        self.token_emb = BertEmbeddings(cfg.vocab_size, D, L + 1, cfg.dropout)
        self.blocks = nn.ModuleList(Block(D, cfg.num_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.decoder_embed = nn.Linear(D, Dd)
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, L + 1, Dd))
        self.decoder_blocks = nn.ModuleList(
            Block(Dd, cfg.decoder_num_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(Dd, eps=1e-6)
        self.mlm_layer = MlmLayer(Dd, D, cfg.vocab_size)
        if cfg.legacy_params:
            self._add_legacy_params()
        self._init_weights()

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth over the encoder blocks, rising linearly from 0 to `rate` (timm's and the official
        fine-tuning's rule); 0 turns it off."""
        depth = len(self.blocks)
        for i, block in enumerate(self.blocks):
            block.drop_path_rate = rate * i / (depth - 1) if depth > 1 else rate

    def _add_legacy_params(self) -> None:
        """Parameters the official model defines but never uses; kept frozen so checkpoints load strictly."""
        cfg, L = self.config, self.config.num_tokens
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, cfg.embed_dim, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 1, cfg.embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L + 1, cfg.decoder_embed_dim))
        self.decoder_pred = nn.Linear(cfg.decoder_embed_dim, cfg.patch_size**2 * 3)
        for module in (self.patch_embed, self.decoder_pred):
            module.requires_grad_(False)
        for param in (self.cls_token, self.pos_embed, self.mask_token, self.decoder_pos_embed):
            param.requires_grad_(False)

    def _init_weights(self) -> None:
        """Official init: xavier-uniform Linear weights, zero biases, unit LayerNorms, N(0, 0.02) embeddings."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.normal_(self.decoder_pos_embed_learned, std=0.02)

    # ---------------------------------------------------------------------------------------
    # Stages

    def embed_tokens(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens long[B, L], mask bool[B, L] -> embeddings (B, 1 + L, D) with [MASK] where masked."""
        ids = tokens.masked_fill(mask, self.mask_token_label)
        cls = torch.full_like(ids[:, :1], self.fake_class_label)
        return self.token_emb(torch.cat([cls, ids], dim=1))

    def forward_encoder(self, x: torch.Tensor, drop: torch.Tensor,
                        n_drop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 1 + L, D), drop bool[B, L] -> (latent (B, 1 + L - n_drop, D), kept positions long[B, 1 + L - n_drop]).

        `n_drop`, the tokens every row drops, is read from `drop` when not given (a host sync: training
        passes it, since it is fixed by the run's config)."""
        B, N, D = x.shape
        if n_drop is None:
            n_drop = int(drop[0].sum()) if B else 0
        keep = F.pad(~drop, (1, 0), value=True)  # (B, 1 + L); the class token is never dropped
        # The kept positions in increasing order: a stable sort puts every kept position (1) before the
        # dropped ones (0) in their own order; its shape is known on the host, unlike `nonzero`'s.
        kept = keep.to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :N - n_drop]
        x = x.gather(1, kept[..., None].expand(-1, -1, D))
        for block in self.blocks:
            x = block(x)
        return self.norm(x), kept

    def forward_decoder(self, latent: torch.Tensor, kept: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """latent (B, K, D), kept long[B, K], mask bool[B, L] -> logits (B, 1 + L, vocab)."""
        x = self.decoder_embed(latent)  # (B, K, Dd)
        B, _, Dd = x.shape
        pad = x[:, :1].expand(B, mask.shape[1] + 1, Dd)  # every position starts as the class output
        x = pad.scatter(1, kept[..., None].expand(-1, -1, Dd), x)  # kept tokens back in place
        masked = F.pad(mask, (1, 0), value=False)[..., None]  # masked-but-kept also get the class output
        x = torch.where(masked, pad, x) + self.decoder_pos_embed_learned
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)
        return self.mlm_layer(x, self.token_emb.word_embeddings.weight.detach())

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """tokens long[B, L], mask/drop bool[B, L] (drop ⊂ mask, equal drop count per row) -> logits (B, 1 + L, vocab)."""
        return self.forward_with_latent(tokens, mask, drop)[0]

    def forward_with_latent(self, tokens: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor,
                            n_drop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward`'s logits (B, 1 + L, vocab) and the encoder output (B, 1 + L - n_drop, D) they were
        decoded from: the training objective scores the one and MAGE-C pools the other. `n_drop`: the
        tokens every row drops, when the caller knows it (else read from `drop`)."""
        latent, kept = self._encode(tokens, mask, drop, n_drop)
        return self.forward_decoder(latent, kept, mask), latent

    def encode_masked(self, tokens: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor,
                      n_drop: int | None = None) -> torch.Tensor:
        """Encoder output (B, 1 + L - n_drop, D) of a masked view; MAGE-C pools it."""
        return self._encode(tokens, mask, drop, n_drop)[0]

    def _encode(self, tokens: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor,
                n_drop: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Checked inputs through `embed_tokens` and `forward_encoder`: (latent, kept positions)."""
        self._check(tokens, mask, drop, n_drop)
        return self.forward_encoder(self.embed_tokens(tokens, mask), drop, n_drop)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Probe feature, nothing masked: mean of last-block tokens 1..L (no final norm), then a
        parameter-free LayerNorm, as the official linear probe (global pool + fresh fc_norm)."""
        last = len(self.blocks) - 1
        return self.layer_features(tokens, [last], ["mean"])[(last, "mean")]  # (B, D)

    def layer_features(self, tokens: torch.Tensor, layers: Sequence[int],
                       poolings: Sequence[str]) -> dict[tuple[int, str], torch.Tensor]:
        """Probe features of several blocks and poolings from ONE forward pass, nothing masked:
        {(block index, pooling): float[B, D or 2D]}. Block i is 0-based (the last is depth - 1); poolings
        are `POOLINGS`; `features` is the last block's "mean"."""
        unknown = sorted(set(poolings) - set(POOLINGS))
        if unknown or any(not 0 <= layer < len(self.blocks) for layer in layers):
            raise ValueError(f"layers must be in [0, {len(self.blocks) - 1}] and poolings in {sorted(POOLINGS)}; "
                             f"got {sorted(set(layers))}, {sorted(set(poolings))}")
        x = self.embed_tokens(tokens, torch.zeros_like(tokens, dtype=torch.bool))
        out: dict[tuple[int, str], torch.Tensor] = {}
        for index, block in enumerate(self.blocks[:max(layers) + 1]):  # blocks past the deepest asked are skipped
            x = block(x)
            if index in layers:
                out.update({(index, pooling): POOLINGS[pooling](x) for pooling in poolings})
        return out

    def _check(self, tokens: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor, n_drop: int | None) -> None:
        if tokens.shape[1] != self.config.num_tokens:
            raise ValueError(f"expected {self.config.num_tokens} tokens per image, got {tokens.shape[1]}")
        if mask.shape != tokens.shape or drop.shape != tokens.shape:
            raise ValueError("tokens, mask and drop must share one shape [B, L]")
        if tokens.shape[0] == 0:
            return
        counts = drop.sum(1)
        expected = counts[0] if n_drop is None else n_drop
        # With `n_drop` given (training, masks made by `masking`), the checks run on the device and the
        # host never waits; otherwise (generation, callers' own masks) the host reads the drop count anyway.
        check = _check_on_device if n_drop is not None else _check_now
        check((drop & ~mask).any().logical_not(), "drop must be a subset of mask")
        check((counts == expected).all(), "every row must drop the same number of tokens (a fixed encoder length)"
              + ("" if n_drop is None else f", here {n_drop}"))


def _check_now(condition: torch.Tensor, message: str) -> None:
    if not bool(condition):
        raise ValueError(message)


def _check_on_device(condition: torch.Tensor, message: str) -> None:
    """`_check_now` without the host waiting for the device: `torch._assert_async` checks on the device (a
    failure there is a device-side assert, fatal to the process: only for masks made by our own code) and
    raises at once on the CPU."""
    try:
        torch._assert_async(condition, message)
    except RuntimeError as exc:
        raise ValueError(message) from exc


def mage_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, codebook_size: int,
              label_smoothing: float = 0.1) -> torch.Tensor:
    """Official loss: label-smoothed cross-entropy on logits[:, 1:, :codebook_size], mean over all masked tokens."""
    logp = F.log_softmax(logits[:, 1:, :codebook_size].float(), dim=-1)  # (B, L, K)
    nll = -logp.gather(-1, tokens[..., None]).squeeze(-1)  # (B, L)
    smooth = -logp.mean(dim=-1)
    per_token = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum()
