"""The CLIP ViT-L/14-336 (CMMD) and DINOv2 ViT-L/14 (dgm-eval) extractors, on tiny random weights in the
official file formats (nothing is downloaded; torch hub's cache is redirected to tmp_path).

Features go through the production path (`statistics.fake_features`: torch-fidelity's reader, extractor and
default layer) and are checked against independent computations: for DINOv2 a transcription of the DINOv2
hub model's forward on the raw official state_dict, for CLIP the TorchScript archive's own forward.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mage_bench.errors import UserError

# torch-fidelity's CLIP loads OpenAI's TorchScript file with torch.jit.load, deprecated in recent torch
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")

CLIP_TINY = {"width": 64, "layers": 2, "patch": 14, "resolution": 28, "embed": 32}
DINOV2_TINY = {"embed_dim": 64, "depth": 2, "patch": 14, "grid": 37}  # pos_embed of the official 518 px models


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """torch hub's cache in tmp_path, the weights variables unset and downloads refused."""
    import torch

    hub_dir = tmp_path / "hub"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub_dir))  # what torch.hub.set_dir sets; restored after
    assert Path(torch.hub.get_dir()) == hub_dir
    for env in ("MAGE_BENCH_CLIP_WEIGHTS", "MAGE_BENCH_DINOV2_WEIGHTS"):
        monkeypatch.delenv(env, raising=False)

    def no_download(*args, **kwargs):
        raise AssertionError("a test tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return hub_dir / "checkpoints"


def _png_images(folder: Path, count: int = 4, size: tuple[int, int] = (40, 36), seed: int = 0) -> tuple[Path, ...]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = []
    for i in range(count):
        file = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(file)
        files.append(file)
    return tuple(files)


def _uint8_batch(files: tuple[Path, ...]):
    import torch
    from PIL import Image

    return torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])


def _preprocess(images, size: int, mean: tuple[float, ...], std: tuple[float, ...]):
    """torch-fidelity's preprocessing: uint8 -> float -> TF1 bilinear resize -> mean/std scaled by 255."""
    import torch
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(size, size), align_corners=False)
    mean_t = torch.tensor(mean).view(1, 3, 1, 1) * 255
    std_t = torch.tensor(std).view(1, 3, 1, 1) * 255
    return (x - mean_t) / std_t


# --------------------------------------------------------------------------------------------
# Tiny weights in the official formats


def write_tiny_dinov2(path: Path, seed: int = 0, embed_dim: int = DINOV2_TINY["embed_dim"],
                      depth: int = DINOV2_TINY["depth"], drop: tuple[str, ...] = ()) -> Path:
    """A random DINOv2 in the official checkpoint's key names and layout (incl. mask_token, LayerScale gammas
    and a 1 + 37 x 37 position embedding), as `dinov2_vitl14_pretrain.pth` stores ViT-L/14."""
    import torch

    g = torch.Generator().manual_seed(seed)
    d, p, grid = embed_dim, DINOV2_TINY["patch"], DINOV2_TINY["grid"]

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    state = {"cls_token": randn(1, 1, d, scale=0.5), "pos_embed": randn(1, 1 + grid * grid, d, scale=0.5),
             "mask_token": randn(1, d, scale=0.02),
             "patch_embed.proj.weight": randn(d, 3, p, p, scale=(3 * p * p) ** -0.5),
             "patch_embed.proj.bias": randn(d, scale=0.1)}
    for i in range(depth):
        b = f"blocks.{i}."
        state.update({
            b + "norm1.weight": 1 + randn(d, scale=0.1), b + "norm1.bias": randn(d, scale=0.1),
            b + "attn.qkv.weight": randn(3 * d, d, scale=d ** -0.5), b + "attn.qkv.bias": randn(3 * d, scale=0.1),
            b + "attn.proj.weight": randn(d, d, scale=d ** -0.5), b + "attn.proj.bias": randn(d, scale=0.1),
            b + "ls1.gamma": 0.5 + torch.rand(d, generator=g),
            b + "norm2.weight": 1 + randn(d, scale=0.1), b + "norm2.bias": randn(d, scale=0.1),
            b + "mlp.fc1.weight": randn(4 * d, d, scale=d ** -0.5), b + "mlp.fc1.bias": randn(4 * d, scale=0.1),
            b + "mlp.fc2.weight": randn(d, 4 * d, scale=(4 * d) ** -0.5), b + "mlp.fc2.bias": randn(d, scale=0.1),
            b + "ls2.gamma": 0.5 + torch.rand(d, generator=g)})
    state.update({"norm.weight": 1 + randn(d, scale=0.1), "norm.bias": randn(d, scale=0.1)})
    for key in drop:
        del state[key]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def dinov2_reference(state: dict, images) -> np.ndarray:
    """The DINOv2 hub model's forward (dinov2/models/vision_transformer.py, xFormers off), transcribed on the raw
    official state_dict, after torch-fidelity's DINOv2 preprocessing (224 px, ImageNet mean/std)."""
    import torch
    import torch.nn.functional as F

    x = _preprocess(images, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    d = state["cls_token"].shape[-1]
    heads = d // 64
    x = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=14)
    batch, _, h0, w0 = x.shape
    x = torch.cat([state["cls_token"].expand(batch, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    # interpolate_pos_encoding: interpolate_offset 0.1, interpolate_antialias False (the hub models' settings)
    pos = state["pos_embed"].float()
    m = int(math.sqrt(pos.shape[1] - 1))
    patch_pos = F.interpolate(pos[:, 1:].reshape(1, m, m, d).permute(0, 3, 1, 2), mode="bicubic",
                              scale_factor=(float(h0 + 0.1) / m, float(w0 + 0.1) / m), antialias=False)
    x = x + torch.cat([pos[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, -1, d)], dim=1)
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for i in range(depth):
        def w(name, i=i):
            return state[f"blocks.{i}.{name}"]

        y = F.layer_norm(x, (d,), w("norm1.weight"), w("norm1.bias"), eps=1e-6)
        qkv = F.linear(y, w("attn.qkv.weight"), w("attn.qkv.bias")).reshape(batch, -1, 3, heads, d // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q * (d // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(batch, -1, d)
        x = x + w("ls1.gamma") * F.linear(y, w("attn.proj.weight"), w("attn.proj.bias"))
        y = F.layer_norm(x, (d,), w("norm2.weight"), w("norm2.bias"), eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, w("mlp.fc1.weight"), w("mlp.fc1.bias"))), w("mlp.fc2.weight"),
                     w("mlp.fc2.bias"))
        x = x + w("ls2.gamma") * y
    return F.layer_norm(x, (d,), state["norm.weight"], state["norm.bias"], eps=1e-6)[:, 0].numpy()


def write_tiny_clip(path: Path, seed: int = 0, **dims) -> Path:
    """A random CLIP ViT as OpenAI ships it: a TorchScript archive (traced) whose state_dict holds the image
    tower (`visual.*`), `text_projection` and `logit_scale`; its forward is the image tower. The values are
    fp16-representable, because torch-fidelity loads the linear/conv/attention weights through fp16 as
    OpenAI's fp16 files need."""
    import warnings

    import torch
    from torch import nn
    from torch_fidelity.feature_extractor_clip import VisionTransformer

    dims = {**CLIP_TINY, **dims}

    class TinyClip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual = VisionTransformer(input_resolution=dims["resolution"], patch_size=dims["patch"],
                                            width=dims["width"], layers=dims["layers"], heads=dims["width"] // 64,
                                            output_dim=dims["embed"])
            self.text_projection = nn.Parameter(torch.randn(48, dims["embed"]))
            self.logit_scale = nn.Parameter(torch.ones([]))

        def forward(self, x):
            return self.visual(x)

    torch.manual_seed(seed)
    model = TinyClip().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.half().float())
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # nn.MultiheadAttention's shape checks
        size = dims["resolution"]
        torch.jit.trace(model, torch.randn(2, 3, size, size)).save(str(path))
    return path


def _load_archive(path: Path):
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu")


# --------------------------------------------------------------------------------------------
# Registration


def test_both_are_registered_non_standard_embeddings_torch_fidelity_only():
    from mage_bench.eval.extractors import FID_EXTRACTORS, standard_extractors

    clip, dino = FID_EXTRACTORS.get("clip-vit-l-14-336px"), FID_EXTRACTORS.get("dinov2-vit-l-14")
    assert (clip.torch_fidelity_name, dino.torch_fidelity_name) == ("clip-vit-l-14-336px", "mage-bench-dinov2-vit-l-14")
    for extractor in (clip, dino):
        assert not extractor.standard and not extractor.classifier and extractor.name not in standard_extractors()
        with pytest.raises(UserError, match="use --backend torch-fidelity"):
            extractor.cleanfid_model(Path("weights.pt"), "cpu")


def test_the_backends_registration_hook_registers_dinov2_idempotently(monkeypatch):
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    from torch_fidelity.utils import resolve_feature_layer_for_metric

    from mage_bench.eval.extractors import register_with_torch_fidelity  # what the backends call
    from mage_bench.eval.foundation_extractors import register_foundation_with_torch_fidelity

    register_with_torch_fidelity()
    for name in ("digits-cnn", "mage-bench-dinov2-vit-l-14"):  # as in a fresh process (restored afterwards)
        monkeypatch.delitem(FEATURE_EXTRACTORS_REGISTRY, name)
    for _ in range(2):
        register_with_torch_fidelity()
        register_foundation_with_torch_fidelity()
    assert {"digits-cnn", "mage-bench-dinov2-vit-l-14", "clip-vit-l-14-336px"} <= set(FEATURE_EXTRACTORS_REGISTRY)
    for metric in ("fid", "kid", "prc", "isc"):
        assert resolve_feature_layer_for_metric(metric, feature_extractor="mage-bench-dinov2-vit-l-14") == "dinov2"
        assert resolve_feature_layer_for_metric(metric, feature_extractor="clip-vit-l-14-336px") == "clip"


# --------------------------------------------------------------------------------------------
# DINOv2


def test_dinov2_features_through_torch_fidelity_match_the_hub_forward(tmp_path, hub):
    import torch

    from mage_bench.eval.extractors import FID_EXTRACTORS
    from mage_bench.eval.foundation_extractors import resolve_dinov2_weights
    from mage_bench.eval.statistics import fake_features

    weights = resolve_dinov2_weights(str(write_tiny_dinov2(tmp_path / "dinov2.pth")), check_architecture=False)
    files = _png_images(tmp_path / "images")
    extractor = FID_EXTRACTORS.get("dinov2-vit-l-14")
    features = fake_features(files, extractor, weights, "cpu", progress=False)
    assert features.shape == (len(files), DINOV2_TINY["embed_dim"]) and np.isfinite(features).all()
    np.testing.assert_array_equal(features, fake_features(files, extractor, weights, "cpu", progress=False))
    state = torch.load(weights, map_location="cpu", weights_only=True)
    with torch.no_grad():
        reference = dinov2_reference(state, _uint8_batch(files))
    np.testing.assert_allclose(features, reference, rtol=1e-4, atol=1e-4)
    assert np.abs(features - features.mean(0)).max() > 1e-2  # the images are told apart


def test_dinov2_network_equals_timm_at_the_native_grid_and_interpolates_as_dinov2(tmp_path):
    """At 518 px no interpolation happens: our network is exactly timm's stock ViT on the converted weights.
    At 224 px the position embedding follows DINOv2's kludge (scale (16 + 0.1) / 37), not a plain resize."""
    import torch
    import torch.nn.functional as F
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    from mage_bench.eval.foundation_extractors import build_dinov2, dinov2_position_embedding

    path = write_tiny_dinov2(tmp_path / "dinov2.pth", seed=1)
    net = build_dinov2(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    stock = VisionTransformer(img_size=518, patch_size=14, embed_dim=64, depth=2, num_heads=1, init_values=1e-5,
                              num_classes=0, global_pool="token").eval()
    stock.load_state_dict(checkpoint_filter_fn(dict(state), stock), strict=True)
    x = torch.randn(2, 3, 518, 518, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(net(x), stock(x), rtol=1e-5, atol=1e-5)
        assert net(torch.randn(2, 3, 224, 224)).shape == (2, 64)
    pos = state["pos_embed"]
    ours = dinov2_position_embedding(pos, 16, 16)
    plain = F.interpolate(pos[:, 1:].reshape(1, 37, 37, 64).permute(0, 3, 1, 2), size=(16, 16), mode="bicubic")
    assert ours.shape == (1, 257, 64) and torch.equal(ours[:, 0], pos[:, 0])
    assert not torch.allclose(ours[:, 1:], plain.permute(0, 2, 3, 1).reshape(1, 256, 64), atol=1e-3)


def test_dinov2_metrics_through_torch_fidelity_calculate_metrics(tmp_path, hub):
    import torch_fidelity
    from torch_fidelity.datasets import ImagesPathDataset

    from mage_bench.eval.extractors import register_with_torch_fidelity
    from mage_bench.eval.foundation_extractors import resolve_dinov2_weights

    weights = resolve_dinov2_weights(str(write_tiny_dinov2(tmp_path / "dinov2.pth")), check_architecture=False)
    register_with_torch_fidelity()
    a = ImagesPathDataset([str(f) for f in _png_images(tmp_path / "a", count=6, seed=1)])
    b = ImagesPathDataset([str(f) for f in _png_images(tmp_path / "b", count=6, seed=2)])
    metrics = torch_fidelity.calculate_metrics(
        input1=a, input2=b, fid=True, kid=True, prc=True, feature_extractor="mage-bench-dinov2-vit-l-14",
        feature_extractor_weights_path=str(weights), cuda=False, cache=False, kid_subset_size=6,
        save_cpu_ram=True, verbose=False)
    assert np.isfinite(metrics["frechet_inception_distance"]) and metrics["frechet_inception_distance"] > 0
    assert {"kernel_inception_distance_mean", "precision", "recall"} <= set(metrics)


def test_dinov2_weights_must_be_vit_l14_for_the_registered_name(tmp_path, hub):
    from mage_bench.eval.extractors import FID_EXTRACTORS

    path = write_tiny_dinov2(tmp_path / "dinov2.pth")
    with pytest.raises(UserError, match=r"width 64, 2 blocks.*not ViT-L/14 \(1024, 24, 14\)"):
        FID_EXTRACTORS.get("dinov2-vit-l-14").resolve_weights(str(path))


def test_dinov2_weights_from_env_and_hub_cache_and_missing(tmp_path, hub, monkeypatch):
    from mage_bench.eval.foundation_extractors import resolve_dinov2_weights

    cached = hub / "dinov2_vitl14_pretrain.pth"
    with pytest.raises(UserError) as missing:
        resolve_dinov2_weights(None, allow_download=False)
    message = str(missing.value)
    assert "MAGE_BENCH_DINOV2_WEIGHTS" in message and str(cached) in message and "--weights" in message
    assert "\n" not in message

    monkeypatch.setenv("MAGE_BENCH_DINOV2_WEIGHTS", str(tmp_path / "absent.pth"))
    with pytest.raises(UserError, match=r"absent\.pth \(from \$MAGE_BENCH_DINOV2_WEIGHTS\) do not exist"):
        resolve_dinov2_weights(None, allow_download=False)
    env_file = write_tiny_dinov2(tmp_path / "env.pth")
    monkeypatch.setenv("MAGE_BENCH_DINOV2_WEIGHTS", str(env_file))
    assert resolve_dinov2_weights(None, allow_download=False, check_architecture=False) == env_file

    monkeypatch.delenv("MAGE_BENCH_DINOV2_WEIGHTS")
    write_tiny_dinov2(cached)
    assert resolve_dinov2_weights(None, allow_download=False, check_architecture=False) == cached


def test_dinov2_download_goes_to_the_hub_cache_and_failures_are_user_errors(tmp_path, hub, monkeypatch):
    import torch

    from mage_bench.eval.foundation_extractors import DINOV2_URL, resolve_dinov2_weights

    def offline(url, dst, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError, match="download failed .*network unreachable.*dinov2_vitl14_pretrain.pth"):
        resolve_dinov2_weights(None)
    fetched = []

    def fake_download(url, dst, **kwargs):
        fetched.append(url)
        write_tiny_dinov2(Path(dst))

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    assert resolve_dinov2_weights(None, check_architecture=False) == hub / "dinov2_vitl14_pretrain.pth"
    assert fetched == [DINOV2_URL]


def test_dinov2_files_in_another_format_are_user_errors(tmp_path, hub):
    import torch

    from mage_bench.eval.foundation_extractors import build_dinov2, resolve_dinov2_weights

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pth"):
        resolve_dinov2_weights(str(junk))
    other = tmp_path / "other.pth"
    torch.save({"model": {"weight": torch.zeros(2)}}, other)
    with pytest.raises(UserError, match="not a state_dict of tensors|not an official DINOv2"):
        resolve_dinov2_weights(str(other))
    torch.save({"weight": torch.zeros(2)}, other)
    with pytest.raises(UserError, match="not an official DINOv2 checkpoint .*cls_token"):
        resolve_dinov2_weights(str(other))
    incomplete = write_tiny_dinov2(tmp_path / "incomplete.pth", drop=("blocks.1.ls2.gamma",))
    with pytest.raises(UserError, match=r"missing keys: blocks\.1\.ls2\.gamma"):
        resolve_dinov2_weights(str(incomplete), check_architecture=False)
    with pytest.raises(UserError, match=r"missing keys: blocks\.1\.ls2\.gamma"):
        build_dinov2(incomplete)


# --------------------------------------------------------------------------------------------
# CLIP


def test_clip_features_through_torch_fidelity_match_the_archive_forward(tmp_path, hub):
    import torch

    from mage_bench.eval.extractors import FID_EXTRACTORS
    from mage_bench.eval.foundation_extractors import clip_embedding_for_cmmd, resolve_clip_weights
    from mage_bench.eval.statistics import fake_features

    weights = resolve_clip_weights(str(write_tiny_clip(tmp_path / "clip.pt")), check_architecture=False)
    files = _png_images(tmp_path / "images")
    extractor = FID_EXTRACTORS.get("clip-vit-l-14-336px")
    features = fake_features(files, extractor, weights, "cpu", progress=False)
    assert features.shape == (len(files), CLIP_TINY["embed"]) and np.isfinite(features).all()
    np.testing.assert_array_equal(features, fake_features(files, extractor, weights, "cpu", progress=False))
    x = _preprocess(_uint8_batch(files), CLIP_TINY["resolution"], (0.48145466, 0.4578275, 0.40821073),
                    (0.26862954, 0.26130258, 0.27577711))
    with torch.no_grad():
        reference = _load_archive(weights)(x).numpy()
    np.testing.assert_allclose(features, reference, rtol=1e-5, atol=1e-5)

    # torch-fidelity's "clip" is the raw projected embedding; CMMD's is unit-norm
    assert not np.allclose(np.linalg.norm(features, axis=1), 1.0)
    unit = clip_embedding_for_cmmd(features)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(unit * np.linalg.norm(features, axis=1, keepdims=True), features, rtol=1e-12)
    as_tensor = clip_embedding_for_cmmd(torch.from_numpy(features))
    assert isinstance(as_tensor, torch.Tensor) and np.allclose(as_tensor.numpy(), unit)


def test_clip_weights_must_be_vit_l14_336_for_the_registered_name(tmp_path, hub):
    from mage_bench.eval.extractors import FID_EXTRACTORS

    path = write_tiny_clip(tmp_path / "clip.pt")
    with pytest.raises(UserError, match=r"\(64, 2, 14, 28, 32\), not ViT-L/14-336's \(1024, 24, 14, 336, 768\)"):
        FID_EXTRACTORS.get("clip-vit-l-14-336px").resolve_weights(str(path))


def test_clip_weights_from_env_and_hub_cache_and_missing(tmp_path, hub, monkeypatch):
    from torch_fidelity.feature_extractor_clip import MODEL_METADATA

    from mage_bench.eval.foundation_extractors import resolve_clip_weights

    cached = hub / "ViT-L-14-336px.pt"
    with pytest.raises(UserError) as missing:
        resolve_clip_weights(None, allow_download=False)
    message = str(missing.value)
    assert "MAGE_BENCH_CLIP_WEIGHTS" in message and str(cached) in message and "--weights" in message
    assert "\n" not in message

    monkeypatch.setenv("MAGE_BENCH_CLIP_WEIGHTS", str(tmp_path / "absent.pt"))
    with pytest.raises(UserError, match=r"absent\.pt \(from \$MAGE_BENCH_CLIP_WEIGHTS\) do not exist"):
        resolve_clip_weights(None, allow_download=False)
    env_file = write_tiny_clip(tmp_path / "env.pt")
    monkeypatch.setenv("MAGE_BENCH_CLIP_WEIGHTS", str(env_file))
    assert resolve_clip_weights(None, allow_download=False, check_architecture=False) == env_file

    monkeypatch.delenv("MAGE_BENCH_CLIP_WEIGHTS")
    # where torch-fidelity's own download puts it
    torch_fidelity_cached = hub / f"clip-vit-l-14-336px-{MODEL_METADATA['clip-vit-l-14-336px']['hash']}.pt"
    write_tiny_clip(torch_fidelity_cached)
    assert resolve_clip_weights(None, allow_download=False, check_architecture=False) == torch_fidelity_cached
    write_tiny_clip(cached)
    assert resolve_clip_weights(None, allow_download=False, check_architecture=False) == cached


def test_clip_download_checks_openai_hash_and_failures_are_user_errors(tmp_path, hub, monkeypatch):
    import torch
    from torch_fidelity.feature_extractor_clip import MODEL_METADATA, MODEL_URLS

    from mage_bench.eval.foundation_extractors import resolve_clip_weights

    def offline(url, dst, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError, match="download failed .*network unreachable.*ViT-L-14-336px.pt"):
        resolve_clip_weights(None)
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        write_tiny_clip(Path(dst))

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    assert resolve_clip_weights(None, check_architecture=False) == hub / "ViT-L-14-336px.pt"
    assert calls == [(MODEL_URLS["clip-vit-l-14-336px"], MODEL_METADATA["clip-vit-l-14-336px"]["hash"])]


def test_clip_files_in_another_format_are_user_errors(tmp_path, hub):
    import warnings

    import torch

    from mage_bench.eval.foundation_extractors import resolve_clip_weights

    state_dict = tmp_path / "state_dict.pt"
    torch.save({"visual.proj": torch.zeros(4, 4)}, state_dict)  # a zip, but no TorchScript archive
    with pytest.raises(UserError, match="state_dict.pt is not a TorchScript archive"):
        resolve_clip_weights(str(state_dict))
    other = tmp_path / "linear.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(other))
    with pytest.raises(UserError, match="hold no CLIP ViT image tower .*visual.proj"):
        resolve_clip_weights(str(other))


@pytest.mark.parametrize("base", ["dgm-eval", "cmmd"])
def test_the_dgm_eval_and_cmmd_profiles_run_end_to_end_on_tiny_weights(base, tmp_path, hub, monkeypatch):
    """The built-in profiles' whole path (checks, one cached feature pass per side, every metric, bootstrap) on
    tiny random weights of the official formats; only the ViT-L size check is lifted for the tiny files."""
    import dataclasses
    import functools

    import yaml

    from mage_bench.eval import foundation_extractors as fe
    from mage_bench.eval.cmmd import cmmd
    from mage_bench.eval.extractors import FID_EXTRACTORS
    from mage_bench.eval.profile_eval import evaluate_profile

    name, resolve, write = {"dgm-eval": ("dinov2-vit-l-14", fe.resolve_dinov2_weights, write_tiny_dinov2),
                            "cmmd": ("clip-vit-l-14-336px", fe.resolve_clip_weights, write_tiny_clip)}[base]
    weights = write(tmp_path / "tiny.pt")
    tiny = dataclasses.replace(FID_EXTRACTORS.get(name),
                               resolve_weights=functools.partial(resolve, check_architecture=False))
    monkeypatch.setitem(FID_EXTRACTORS._items, name, tiny)
    real, fake = tmp_path / "real", tmp_path / "fake"
    _png_images(real.mkdir() or real, count=12, size=(32, 32), seed=1)
    _png_images(fake.mkdir() or fake, count=12, size=(32, 32), seed=2)
    profile = tmp_path / f"tiny-{base}.yaml"
    profile.write_text(yaml.safe_dump({"base": base, "weights_sha256": "", "num_samples": 12, "num_real": 12,
                                       "bootstrap": 10, "kid_subsets": 5}))
    records = {r["metric"]: r for r in evaluate_profile(fake, str(real), str(profile), weights=str(weights),
                                                        cache_dir=tmp_path / "cache")}
    expected = {"dgm-eval": {"fid", "kid", "precision", "recall", "density", "coverage"}, "cmmd": {"cmmd"}}[base]
    assert set(records) == expected and all(np.isfinite(r["value"]) for r in records.values())
    for r in records.values():
        assert r["feature_extractor"] == name and r["ci_low"] <= r["value"] <= r["ci_high"], r
    if base == "cmmd":  # CMMD of the unit-norm embeddings, as the published code takes them
        features = {json.loads((d / "meta.json").read_text())["images"].split(":")[1]: np.load(d / "features.npy")
                    for d in (tmp_path / "cache" / "features").iterdir()}
        x, y = (fe.clip_embedding_for_cmmd(features[str(real.resolve())].astype(np.float64)),
                fe.clip_embedding_for_cmmd(features[str(fake.resolve())].astype(np.float64)))
        assert records["cmmd"]["value"] == pytest.approx(cmmd(x, y), rel=1e-12)
