"""Foundation-model feature extractors for the modern generation metrics, registered in `FID_EXTRACTORS`.

- `clip-vit-l-14-336px` (CMMD, Jayasumana et al. 2024): OpenAI's CLIP ViT-L/14 at 336 px, through
  torch-fidelity's own extractor (`FeatureExtractorCLIP`), which reads OpenAI's TorchScript file
  `ViT-L-14-336px.pt` (only its state_dict: the archive's code is never run) and rebuilds the image tower.
  Its feature "clip" [B, 768] is `ln_post(CLS) @ proj`, the image embedding *before* normalisation (OpenAI's
  `encode_image`). CMMD's published code (google-research/cmmd: scenic's CLIP `__call__`, normalize=True)
  divides every embedding by its L2 norm before the MMD: apply `clip_embedding_for_cmmd` to the "clip"
  features first. Preprocessing differs from CMMD's in the resize only: torch-fidelity resizes the uint8
  image to 336x336 with TF1-compatible bilinear interpolation (no crop, no antialias); CMMD centre-crops and
  resizes with PIL bicubic (antialiased). Both then scale to [0, 1] and normalise with CLIP's mean/std.
- `dinov2-vit-l-14` (dgm-eval, Stein et al. 2023): DINOv2 ViT-L/14 from Meta's official checkpoint
  (`dinov2_vitl14_pretrain.pth`, a plain state_dict, loaded with weights_only=True), built with timm. torch-
  fidelity's own DINOv2 extractor only loads from GitHub through torch.hub (a weights path raises
  NotImplementedError), so ours is registered with torch-fidelity as `mage-bench-dinov2-vit-l-14`. Its
  preprocessing is torch-fidelity's `FeatureExtractorDinoV2.forward` (uint8 -> TF1 bilinear 224x224 ->
  ImageNet mean/std), its feature "dinov2" [B, 1024] is what the DINOv2 hub model's forward returns: the CLS
  token after the final norm, with the 37x37 position embedding interpolated to 16x16 as DINOv2 does it
  (bicubic, scale factor (16 + 0.1) / 37, no antialias). dgm-eval itself resizes with PIL bicubic.

Neither has a clean-fid path (`--backend torch-fidelity` only) nor a classifier (no IS).

Weights come from `--weights`, the environment (MAGE_BENCH_CLIP_WEIGHTS, MAGE_BENCH_DINOV2_WEIGHTS), torch
hub's cache (`<hub>/checkpoints/`) or a download into it (only with allow_download). The registered
`resolve_weights` also checks the architecture (ViT-L/14: width 1024, 24 blocks; CLIP at 336 px with a
768-d embedding), so the names never stand for another network; `resolve_clip_weights(...,
check_architecture=False)` and `resolve_dinov2_weights(...)` likewise accept any ViT of the format (tests use
tiny random ones).

This module imports nothing from extractors.py (no import cycle): it lists its entries' fields in
`FOUNDATION_EXTRACTORS`, which extractors.py registers as `FidExtractor`s, and extractors'
`register_with_torch_fidelity` calls `register_foundation_with_torch_fidelity`.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mage_bench.errors import UserError

CLIP_NAME = "clip-vit-l-14-336px"
CLIP_FILE = "ViT-L-14-336px.pt"
CLIP_ENV = "MAGE_BENCH_CLIP_WEIGHTS"
# (width, blocks, patch, input resolution, embedding) of CLIP ViT-L/14 at 336 px
CLIP_ARCHITECTURE = (1024, 24, 14, 336, 768)

DINOV2_NAME = "dinov2-vit-l-14"
DINOV2_TORCH_FIDELITY_NAME = "mage-bench-dinov2-vit-l-14"
DINOV2_FILE = "dinov2_vitl14_pretrain.pth"
DINOV2_URL = f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/{DINOV2_FILE}"
DINOV2_ENV = "MAGE_BENCH_DINOV2_WEIGHTS"
DINOV2_INPUT_SIZE = 224  # torch-fidelity's FeatureExtractorDinoV2.INPUT_IMAGE_SIZE
DINOV2_INTERPOLATE_OFFSET = 0.1  # DINOv2's hub models: interpolate_offset=0.1, interpolate_antialias=False
DINOV2_HEAD_DIM = 64  # every DINOv2 model: heads = embed_dim // 64


# --------------------------------------------------------------------------------------------
# Shared: finding the file


def _locate(label: str, filename: str, env: str, path: str | None, cache_names: tuple[str, ...]) -> Path | None:
    """The weights file given (`path`, else $`env`), or the first of `cache_names` in torch hub's cache;
    None when none of them is there."""
    import torch

    given = path or os.environ.get(env)
    if given:
        weights = Path(given)
        if not weights.is_file():
            source = "" if path else f" (from ${env})"
            raise UserError(f"{label} weights {weights}{source} do not exist; pass the file {filename} "
                            f"with --weights or set {env}")
        return weights
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    return next((checkpoints / name for name in cache_names if (checkpoints / name).is_file()), None)


def _download(label: str, filename: str, env: str, url: str, progress: bool, allow_download: bool,
              hash_prefix: str | None = None) -> Path:
    """`url` into torch hub's cache as `filename` (only with `allow_download`), else a UserError."""
    import torch

    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not allow_download:
        raise UserError(f"{label} weights {filename} are not on this machine; pass --weights PATH, set "
                        f"{env}=PATH or put the file at {hub_file} (or allow the download)")
    hub_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(hub_file), hash_prefix=hash_prefix, progress=progress)
    except Exception as exc:  # no internet, proxy, HTTP error, wrong hash: all mean "put the file there yourself"
        raise UserError(f"{label} weights are not on this machine and the download failed ({exc}); "
                        f"put {filename} at {hub_file}, pass --weights PATH or set {env}") from None
    return hub_file


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _summarise(keys: list[str], limit: int = 4) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _check_against(expected: Mapping[str, tuple[int, ...]], given: Mapping[str, Any], source: str,
                   what: str) -> None:
    """A UserError listing the missing, unexpected and mis-shaped keys of `given` against `expected`."""
    shapes = {k: tuple(getattr(v, "shape", ())) for k, v in given.items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(f"{k} {shapes[k]} != {expected[k]}" for k in set(expected) & set(shapes) if shapes[k] != expected[k])
    problems = [f"{kind}: {_summarise(keys)}" for kind, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)) if keys]
    if problems:
        raise UserError(f"{source} does not match {what}: " + "; ".join(problems))


def _unsupported_cleanfid(name: str) -> Callable[[Path, str], Callable]:
    def model(weights: Path, device: str) -> Callable:
        raise UserError(f"the {name} extractor has no clean-fid implementation here (its network and "
                        "preprocessing are torch-fidelity's); use --backend torch-fidelity")

    return model


# --------------------------------------------------------------------------------------------
# CLIP ViT-L/14-336 (CMMD)


@dataclass(frozen=True)
class ClipArchitecture:
    width: int
    layers: int
    patch_size: int
    resolution: int
    embed_dim: int

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        return self.width, self.layers, self.patch_size, self.resolution, self.embed_dim


# What torch-fidelity's `build_model` drops from the archive's state_dict before loading the image tower.
_CLIP_DROPPED = {"input_resolution", "context_length", "vocab_size", "positional_embedding", "text_projection",
                 "logit_scale", "token_embedding.weight"}


def _clip_model_url() -> tuple[str, str]:
    """(download URL, sha256 of the file) of OpenAI's ViT-L/14-336 archive, as torch-fidelity has them."""
    from torch_fidelity.feature_extractor_clip import MODEL_METADATA, MODEL_URLS

    return MODEL_URLS[CLIP_NAME], MODEL_METADATA[CLIP_NAME]["hash"]


def read_clip_state(weights: str | os.PathLike) -> dict[str, Any]:
    """The state_dict of an OpenAI CLIP TorchScript archive, as torch-fidelity reads it (`torch.jit.load`,
    then only `.state_dict()`: the archive's code is never run); a UserError when it is not one."""
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; torch-fidelity still uses it
            warnings.simplefilter("ignore", DeprecationWarning)
            archive = torch.jit.load(str(weights), map_location="cpu")
    except Exception as exc:
        raise UserError(f"{weights} is not a TorchScript archive ({_first_line(exc)}); CLIP needs OpenAI's "
                        f"{CLIP_FILE}") from None
    return dict(archive.state_dict())


def clip_architecture(state: Mapping[str, Any], source: str = "the CLIP weights") -> ClipArchitecture:
    """The image tower's dimensions, inferred from the state_dict as torch-fidelity's `build_model` does;
    a UserError when it is not a CLIP ViT's, or does not load strictly into torch-fidelity's tower."""
    import torch
    from torch_fidelity.feature_extractor_clip import CLIPVisual

    needed = ["visual.proj", "visual.conv1.weight", "visual.positional_embedding", "visual.class_embedding",
              "text_projection"]
    missing = [k for k in needed if k not in state]
    if missing:
        raise UserError(f"{source} hold no CLIP ViT image tower (no {', '.join(missing)}); CLIP needs OpenAI's "
                        f"{CLIP_FILE}")
    width, _, _, patch = state["visual.conv1.weight"].shape
    layers = sum(1 for k in state if k.startswith("visual.") and k.endswith(".attn.in_proj_weight"))
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    arch = ClipArchitecture(width=int(width), layers=layers, patch_size=int(patch), resolution=int(patch * grid),
                            embed_dim=int(state["text_projection"].shape[1]))
    if arch.width % 64:
        raise UserError(f"{source}: CLIP's width {arch.width} is not a multiple of its 64-d heads")
    with torch.device("meta"):  # shapes only, nothing allocated
        tower = CLIPVisual(arch.embed_dim, arch.resolution, arch.layers, arch.width, arch.patch_size)
    expected = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    kept = {k: v for k, v in state.items()
            if k not in _CLIP_DROPPED and not k.startswith(("transformer.", "ln_final."))}
    _check_against(expected, kept, source, f"torch-fidelity's CLIP image tower {arch.as_tuple()}")
    return arch


def resolve_clip_weights(path: str | None, progress: bool = False, allow_download: bool = True, *,
                         check_architecture: bool = True) -> Path:
    """OpenAI's CLIP ViT-L/14-336 TorchScript file: given, from $MAGE_BENCH_CLIP_WEIGHTS, in torch hub's cache
    (`ViT-L-14-336px.pt`, or the name torch-fidelity's own download gives it), or downloaded there (only with
    `allow_download`; the download is checked against the sha256 in OpenAI's URL). The file must be a
    TorchScript archive holding a CLIP ViT image tower; with `check_architecture` (the registered extractor)
    it must be ViT-L/14 at 336 px with a 768-d embedding."""
    url, sha256 = _clip_model_url()
    weights = _locate("CLIP ViT-L/14-336", CLIP_FILE, CLIP_ENV, path,
                      (CLIP_FILE, f"{CLIP_NAME}-{sha256}.pt"))
    if weights is None:
        weights = _download("CLIP ViT-L/14-336", CLIP_FILE, CLIP_ENV, url, progress, allow_download, sha256)
    arch = clip_architecture(read_clip_state(weights), str(weights))
    if check_architecture and arch.as_tuple() != CLIP_ARCHITECTURE:
        raise UserError(f"{weights} holds a CLIP ViT with (width, blocks, patch, resolution, embedding) = "
                        f"{arch.as_tuple()}, not ViT-L/14-336's {CLIP_ARCHITECTURE}; use OpenAI's {CLIP_FILE}")
    return weights


def clip_embedding_for_cmmd(features: Any) -> Any:
    """The "clip" features (NumPy or torch, [N, D]) divided row-wise by their L2 norm: CMMD's embeddings.

    torch-fidelity's "clip" feature is the raw projected CLS embedding (norm ~ 10-20 for real CLIP); the
    published CMMD code normalises every embedding to unit length before the Gaussian-kernel MMD (sigma 10),
    so the kernel sees squared distances in [0, 4]. Skipping this changes CMMD's values entirely."""
    try:
        import torch

        if isinstance(features, torch.Tensor):
            return features / features.norm(dim=-1, keepdim=True)
    except ImportError:  # pragma: no cover - NumPy-only callers
        pass
    import numpy as np

    features = np.asarray(features)
    return features / np.linalg.norm(features, axis=-1, keepdims=True)


# --------------------------------------------------------------------------------------------
# DINOv2 ViT-L/14 (dgm-eval)


@dataclass(frozen=True)
class DinoV2Architecture:
    embed_dim: int
    depth: int
    patch_size: int
    grid: int  # the position embedding's grid (37 for the official 518 px models)
    mlp_hidden: int

    @property
    def num_heads(self) -> int:
        return self.embed_dim // DINOV2_HEAD_DIM


# The official checkpoints' keys outside the blocks (`mask_token` is in every one and unused at inference).
_DINOV2_KEYS = ("cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
                "norm.weight", "norm.bias")


def read_dinov2_state(weights: str | os.PathLike) -> dict[str, Any]:
    """The official DINOv2 checkpoint (a plain state_dict), loaded with weights_only=True; a UserError when
    the file is unsafe, unreadable or not in that format."""
    import torch

    from mage_bench.io import safe_torch_load

    state = safe_torch_load(weights)  # CheckpointError (a UserError) when missing, unsafe or not torch
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{weights} is not a state_dict of tensors; DINOv2 needs Meta's {DINOV2_FILE}")
    missing = [k for k in _DINOV2_KEYS if k not in state]
    if missing:
        raise UserError(f"{weights} is not an official DINOv2 checkpoint (no {', '.join(missing)}); "
                        f"use Meta's {DINOV2_FILE}")
    if "register_tokens" in state or any(".mlp.w12." in k for k in state):
        raise UserError(f"{weights} is a DINOv2 with registers or SwiGLU (ViT-g); this extractor is the plain "
                        f"ViT of {DINOV2_FILE}")
    return dict(state)


def dinov2_architecture(state: Mapping[str, Any], source: str = "the DINOv2 weights") -> DinoV2Architecture:
    """Dimensions inferred from an official DINOv2 state_dict (heads = embed_dim // 64, as in every DINOv2)."""
    embed_dim, _, patch, patch_w = state["patch_embed.proj.weight"].shape
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    tokens = state["pos_embed"].shape[1] - 1
    grid = math.isqrt(tokens)
    if patch != patch_w or grid * grid != tokens or embed_dim % DINOV2_HEAD_DIM or depth == 0:
        raise UserError(f"{source}: not a DINOv2 ViT (patch {patch}x{patch_w}, {tokens} position tokens, "
                        f"width {embed_dim}, {depth} blocks)")
    if "blocks.0.mlp.fc1.weight" not in state:
        raise UserError(f"{source}: no blocks.0.mlp.fc1.weight (unchunked blocks with an MLP expected)")
    return DinoV2Architecture(embed_dim=int(embed_dim), depth=depth, patch_size=int(patch), grid=grid,
                              mlp_hidden=int(state["blocks.0.mlp.fc1.weight"].shape[0]))


def dinov2_position_embedding(pos_embed: Any, height: int, width: int) -> Any:
    """[1, 1 + height * width, D]: DINOv2's `interpolate_pos_encoding` of the [1, 1 + M * M, D] embedding to a
    height x width patch grid (bicubic, scale factors (n + 0.1) / M, no antialias), in float32."""
    import torch
    import torch.nn.functional as F

    tokens = pos_embed.shape[1] - 1
    if tokens == height * width and height == width:
        return pos_embed
    side = math.isqrt(tokens)
    embed = pos_embed.float()
    grid = embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, mode="bicubic", antialias=False,
                         scale_factor=((height + DINOV2_INTERPOLATE_OFFSET) / side,
                                       (width + DINOV2_INTERPOLATE_OFFSET) / side))
    assert tuple(grid.shape[-2:]) == (height, width), grid.shape
    return torch.cat([embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, height * width, -1)], dim=1)


@functools.cache
def _dinov2_vit_class() -> type:
    """timm's VisionTransformer with DINOv2's position-embedding interpolation (defined on first use)."""
    import torch
    from timm.models.vision_transformer import VisionTransformer

    class DinoV2VisionTransformer(VisionTransformer):
        """Built with dynamic_img_size, so patch tokens arrive as [B, H, W, C] at any input size."""

        def _pos_embed(self, x):
            batch, height, width, channels = x.shape
            tokens = torch.cat([self.cls_token.expand(batch, -1, -1), x.reshape(batch, -1, channels)], dim=1)
            return tokens + dinov2_position_embedding(self.pos_embed, height, width).to(tokens.dtype)

    return DinoV2VisionTransformer


def _dinov2_network(arch: DinoV2Architecture) -> Any:
    """timm's ViT for `arch` (patch 14, LayerScale, no head, CLS token after the final norm), uninitialised."""
    return _dinov2_vit_class()(
        img_size=arch.grid * arch.patch_size, patch_size=arch.patch_size, embed_dim=arch.embed_dim,
        depth=arch.depth, num_heads=arch.num_heads, mlp_ratio=arch.mlp_hidden / arch.embed_dim, qkv_bias=True,
        init_values=1e-5, num_classes=0, global_pool="token", dynamic_img_size=True, weight_init="skip")


def _dinov2_converted(state: Mapping[str, Any], net: Any, arch: DinoV2Architecture, source: str) -> dict[str, Any]:
    """The official state_dict in timm's names (timm's `checkpoint_filter_fn`: drops mask_token; the position
    embedding is already on the network's grid), checked key by key against `net` (a UserError otherwise)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    converted = checkpoint_filter_fn(dict(state), net)
    _check_against({k: tuple(v.shape) for k, v in net.state_dict().items()}, converted, source,
                   f"DINOv2 ViT (width {arch.embed_dim}, {arch.depth} blocks, patch {arch.patch_size})")
    return converted


def check_dinov2_state(state: Mapping[str, Any], source: str = "the DINOv2 weights") -> DinoV2Architecture:
    """The architecture of an official DINOv2 state_dict, after checking that it loads strictly into the
    network `build_dinov2` makes of it (built on the meta device: shapes only, nothing allocated)."""
    import torch

    arch = dinov2_architecture(state, source)
    with torch.device("meta"):
        net = _dinov2_network(arch)
    _dinov2_converted(state, net, arch, source)
    return arch


def build_dinov2(weights: str | os.PathLike | Mapping[str, Any], device: str = "cpu") -> Any:
    """The DINOv2 network of an official checkpoint (a path or its state_dict), of whatever size it holds:
    timm's ViT computing what the DINOv2 hub model's forward returns, the weights converted by timm's
    `checkpoint_filter_fn` and loaded strictly. Eval mode, no gradients."""
    source = "the DINOv2 state_dict" if isinstance(weights, Mapping) else str(weights)
    state = dict(weights) if isinstance(weights, Mapping) else read_dinov2_state(weights)
    arch = dinov2_architecture(state, source)
    net = _dinov2_network(arch)
    net.load_state_dict(_dinov2_converted(state, net, arch, source), strict=True)
    return net.to(device).eval().requires_grad_(False)


def resolve_dinov2_weights(path: str | None, progress: bool = False, allow_download: bool = True, *,
                           check_architecture: bool = True) -> Path:
    """Meta's DINOv2 ViT-L/14 checkpoint: given, from $MAGE_BENCH_DINOV2_WEIGHTS, in torch hub's cache
    (`dinov2_vitl14_pretrain.pth`, where DINOv2's own hub loader puts it), or downloaded there (only with
    `allow_download`). It must be an official DINOv2 state_dict that loads strictly into `build_dinov2`'s
    network; with `check_architecture` (the registered extractor) a ViT-L/14: width 1024, 24 blocks, patch 14."""
    weights = _locate("DINOv2 ViT-L/14", DINOV2_FILE, DINOV2_ENV, path, (DINOV2_FILE,))
    if weights is None:
        weights = _download("DINOv2 ViT-L/14", DINOV2_FILE, DINOV2_ENV, DINOV2_URL, progress, allow_download)
    arch = check_dinov2_state(read_dinov2_state(weights), str(weights))
    if check_architecture and (arch.embed_dim, arch.depth, arch.patch_size) != (1024, 24, 14):
        raise UserError(f"{weights} holds a DINOv2 ViT of width {arch.embed_dim}, {arch.depth} blocks, patch "
                        f"{arch.patch_size}, not ViT-L/14 (1024, 24, 14); use Meta's {DINOV2_FILE}")
    return weights


@functools.cache
def _dinov2_extractor_class() -> type:
    """torch-fidelity's FeatureExtractorDinoV2 with the network from a weights file (defined on first use)."""
    import torch
    import torchvision
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.helpers import text_to_dtype, vassert
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    class DinoV2Extractor(FeatureExtractorBase):
        INPUT_IMAGE_SIZE = DINOV2_INPUT_SIZE

        def __init__(self, name, features_list, feature_extractor_weights_path=None,
                     feature_extractor_internal_dtype=None, **kwargs):
            super().__init__(name, features_list)
            if feature_extractor_weights_path is None:
                raise UserError(f"{name} needs its weights file (feature_extractor_weights_path): pass {DINOV2_FILE} "
                                f"with --weights or set {DINOV2_ENV}")
            vassert(feature_extractor_internal_dtype in ("float32", "float64", None),
                    "Only 32-bit floats are supported for internal dtype of this feature extractor")
            self.feature_extractor_internal_dtype = text_to_dtype(feature_extractor_internal_dtype, "float32")
            self.model = build_dinov2(feature_extractor_weights_path)
            self.to(self.feature_extractor_internal_dtype)
            self.requires_grad_(False)
            self.eval()

        def forward(self, x):  # torch-fidelity's FeatureExtractorDinoV2.forward, line for line
            vassert(torch.is_tensor(x) and x.dtype == torch.uint8,
                    "Expecting image as torch.Tensor with dtype=torch.uint8")
            vassert(x.dim() == 4 and x.shape[1] == 3, f"Input is not Bx3xHxW: {x.shape}")
            x = x.to(self.feature_extractor_internal_dtype)
            x = interpolate_bilinear_2d_like_tensorflow1x(
                x, size=(self.INPUT_IMAGE_SIZE, self.INPUT_IMAGE_SIZE), align_corners=False)
            x = torchvision.transforms.functional.normalize(
                x, (255 * 0.485, 255 * 0.456, 255 * 0.406), (255 * 0.229, 255 * 0.224, 255 * 0.225), inplace=False)
            out = {"dinov2": self.model(x).to(torch.float32)}
            return tuple(out[a] for a in self.features_list)

        @staticmethod
        def get_provided_features_list():
            return ("dinov2",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "dinov2", "fid": "dinov2", "kid": "dinov2", "prc": "dinov2"}[metric]

        @staticmethod
        def can_be_compiled():
            return True

        @staticmethod
        def get_dummy_input_for_compile():
            return (torch.rand([1, 3, 4, 4]) * 255).to(torch.uint8)

    return DinoV2Extractor


# --------------------------------------------------------------------------------------------
# Registration


# The `FidExtractor` fields of each entry; extractors.py registers them in FID_EXTRACTORS.
FOUNDATION_EXTRACTORS: tuple[dict[str, Any], ...] = (
    {"name": CLIP_NAME, "standard": False, "classifier": False, "torch_fidelity_name": CLIP_NAME,
     "resolve_weights": resolve_clip_weights, "cleanfid_model": _unsupported_cleanfid(CLIP_NAME),
     "cleanfid_resize": lambda: None},
    {"name": DINOV2_NAME, "standard": False, "classifier": False, "torch_fidelity_name": DINOV2_TORCH_FIDELITY_NAME,
     "resolve_weights": resolve_dinov2_weights, "cleanfid_model": _unsupported_cleanfid(DINOV2_NAME),
     "cleanfid_resize": lambda: None},
)


def register_foundation_with_torch_fidelity() -> None:
    """Make our DINOv2 a torch-fidelity feature extractor (idempotent). CLIP needs nothing: torch-fidelity's
    own `clip-vit-l-14-336px` takes the weights file."""
    import torch_fidelity
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if DINOV2_TORCH_FIDELITY_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(DINOV2_TORCH_FIDELITY_NAME, _dinov2_extractor_class())
