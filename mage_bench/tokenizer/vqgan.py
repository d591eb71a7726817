"""The VQGAN tokenizer of MAGE (MaskGIT's architecture), configurable down to digit size.

At the `vqgan_mage` preset the module tree, and so `state_dict()`, has exactly the official key
names and shapes: `encoder.*`, `decoder.*`, `quantize.embedding.weight`. What differs from the
classic taming VQGAN (and is reproduced here on purpose): no attention blocks, convolutions inside
residual blocks without bias, average-pool downsampling, no quant_conv/post_quant_conv.

One quirk is kept for weight compatibility: when a residual block changes width, MaskGIT's
shortcut 1x1 convolution is applied to the block's *output*, not its input
(`out = h + shortcut(h)`), and the official PyTorch port does the same.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mage_bench.config import TokenizerConfig


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(out_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            return h + self.nin_shortcut(h)  # MaskGIT quirk: the shortcut sees h, see module docstring
        return x + h


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` (residual blocks) and an optional `downsample`/`upsample`."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)


class _Middle(nn.Module):
    def __init__(self, channels: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups, dropout)
        self.block_2 = ResnetBlock(channels, channels, groups, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.block_1(x))


class Encoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        g, widths = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1, bias=False)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for width in widths:
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, width, g, cfg.dropout))
                block_in = width
            self.down.append(_Level(blocks))
        self.mid = _Middle(block_in, g, cfg.dropout)
        self.norm_out = group_norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, z, H/d, W/d]
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for block in level.block:
                h = block(h)
            if i != len(self.down) - 1:
                h = F.avg_pool2d(h, kernel_size=2, stride=2)  # parameter-free, as in MaskGIT
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        g, widths = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        block_in = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _Middle(block_in, g, cfg.dropout)
        levels: list[_Level] = []
        for i in reversed(range(len(widths))):  # built coarse-to-fine, stored by level index
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, widths[i], g, cfg.dropout))
                block_in = widths[i]
            level = _Level(blocks)
            if i != 0:
                level.upsample = Upsample(block_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # [B, z, h, w] -> [B, C, h*d, w*d]
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            for block in self.up[i].block:
                h = block(h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """L2 nearest-code quantizer with a straight-through estimator."""

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25) -> None:
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)  # official init

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Indices of the nearest codes: z float[B, D, h, w] -> long[B, h, w]."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # [B*h*w, D]
        codes = self.embedding.weight  # [K, D]
        # In fp32 even when the encoder ran under autocast: a code choice should not hinge on bf16 rounding.
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat, codes = flat.float(), codes.float()
            # ||z||^2 is the same for every code, so argmin over ||e||^2 - 2 z.e picks the nearest.
            dist = codes.pow(2).sum(1)[None, :] - 2.0 * flat @ codes.t()  # [B*h*w, K]
        return dist.argmin(dim=1).view(z.shape[0], z.shape[2], z.shape[3])

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """long[B, h, w] -> float[B, D, h, w]."""
        return self.embedding(indices).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [B, D, h, w] -> (straight-through z_q [B, D, h, w], codebook + beta * commitment loss, indices)."""
        indices = self.nearest(z)
        z_q = self.lookup(indices)
        # The official weights were trained with taming's "legacy" loss, which puts beta on the
        # codebook term; we train with the loss of the VQ-VAE paper (beta on the commitment term).
        loss = F.mse_loss(z_q, z.detach()) + self.beta * F.mse_loss(z, z_q.detach())
        z_q = z + (z_q - z).detach()
        return z_q, loss, indices


class VQGAN(nn.Module):
    """Tokenizer API (ARCHITECTURE.md): `encode` images in [0, 1] to indices, `decode` them back."""

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
        if cfg.z_channels != cfg.embed_dim:
            # Not in the official model (z_channels == embed_dim there, so these are absent and
            # the official keys stay exact): low-dimensional codes are easier to keep in use.
            self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
            self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def codebook_size(self) -> int:
        return self.config.n_embed

    @property
    def token_grid(self) -> int:
        return self.config.token_grid

    def _latent(self, images: torch.Tensor) -> torch.Tensor:
        z = self.encoder(images)
        return self.quant_conv(z) if hasattr(self, "quant_conv") else z

    def _pixels(self, z_q: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "post_quant_conv"):
            z_q = self.post_quant_conv(z_q)
        return self.decoder(z_q)

    def _check_images(self, images: torch.Tensor) -> None:
        d = self.config.downsample
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images [B, {self.config.in_channels}, H, W], got {tuple(images.shape)}")
        if images.shape[2] % d or images.shape[3] % d:
            raise ValueError(f"image size {tuple(images.shape[2:])} must be divisible by the tokenizer stride {d}")

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """float[B, 3, H, W] in [0, 1] -> long[B, H/d, W/d] codebook indices."""
        self._check_images(images)
        return self.quantize.nearest(self._latent(images))

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """long[B, h, w] -> float[B, 3, h*d, w*d], clamped to [0, 1] as MAGE's generation script does."""
        if indices.dtype != torch.long or indices.ndim != 3:
            raise ValueError(f"expected long indices [B, h, w], got {indices.dtype} {tuple(indices.shape)}")
        return self._pixels(self.quantize.lookup(indices)).clamp(0.0, 1.0)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction [B, 3, H, W] unclamped, VQ loss, indices [B, h, w], pre-quantization latent)."""
        z = self._latent(images)
        z_q, vq_loss, indices = self.quantize(z)
        return self._pixels(z_q), vq_loss, indices, z
