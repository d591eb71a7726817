"""Feature extractors for the generation metrics (FID, IS, KID, precision/recall).

`FID_EXTRACTORS` is the registry. Each entry names its weights, how to get them, and the networks the two
backends call:

- `inception-v3`: the standard one. The weights are torch-fidelity's conversion of the TensorFlow
  Inception (2015-12-05) that defines FID/IS; from a local file (`--weights`, or the environment
  variable MAGE_BENCH_INCEPTION_WEIGHTS), torch hub's cache, or torch-fidelity's download URL. Only
  numbers from these weights may be called "FID" and "IS".
- `digits-cnn`: a small classifier of the bundled digits, trained here (seeded) and cached under
  `models/digits-cnn/` with a card holding its test accuracy. Its penultimate layer gives FID/KID/PR
  and its softmax IS, through the same torch-fidelity code path (it is registered there). Numbers
  from it are "digits-cnn FD/IS", never Inception FID.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mage_bench.errors import UserError
from mage_bench.eval import foundation_extractors
from mage_bench.registry import Registry

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
INCEPTION_ENV = "MAGE_BENCH_INCEPTION_WEIGHTS"
DIGITS_CNN_DIR = Path("models/digits-cnn")
DIGITS_CNN_FILE = "digits-cnn.pt"
DIGITS_CNN_MIN_ACCURACY = 0.97


@dataclass(frozen=True)
class FidExtractor:
    name: str  # what records say in `feature_extractor`
    standard: bool  # True only for the Inception weights that define FID/IS
    torch_fidelity_name: str  # its name in torch-fidelity's registry
    # (path given or None, progress, allow_download=True) -> weights file. With allow_download=False nothing
    # is fetched over the network: a file not on this machine is a UserError saying how to provide it.
    resolve_weights: Callable[..., Path]
    cleanfid_model: Callable[[Path, str], Callable]  # (weights, device) -> float [B,3,S,S] in [0,255] -> [B,D]
    cleanfid_resize: Callable[[], Callable | None]  # None: clean-fid's own resize (to 299 px)
    # True when the network ends in a classifier whose softmax IS may be taken from (Inception, digits-cnn);
    # embedding networks (CLIP, DINOv2) give no IS.
    classifier: bool = True


FID_EXTRACTORS: Registry[FidExtractor] = Registry("feature extractor")


def standard_extractors() -> set[str]:
    """The extractors whose numbers may be called FID/IS/KID (the Inception weights that define them)."""
    return {name for name in FID_EXTRACTORS if FID_EXTRACTORS.get(name).standard}


# --------------------------------------------------------------------------------------------
# Inception-v3 (standard)


def resolve_inception_weights(path: str | None, progress: bool = False, allow_download: bool = True) -> Path:
    """The Inception weights file: given, from the environment, in torch hub's cache, or downloaded there
    (only with `allow_download`; without it a missing file is a UserError saying where to put it)."""
    import torch

    from mage_bench.io import safe_torch_load

    given = path or os.environ.get(INCEPTION_ENV)
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if given:
        weights = Path(given)
        if not weights.is_file():
            source = "" if path else f" (from ${INCEPTION_ENV})"
            raise UserError(f"Inception weights {weights}{source} do not exist; pass the file {INCEPTION_FILE} "
                            f"with --weights or set {INCEPTION_ENV}")
    elif hub_file.is_file():
        weights = hub_file
    elif not allow_download:
        raise UserError(f"Inception weights {INCEPTION_FILE} are not on this machine; pass --weights PATH, set "
                        f"{INCEPTION_ENV}=PATH or put the file at {hub_file} (or allow the download)")
    else:
        hub_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(INCEPTION_URL, str(hub_file), progress=progress)
        except Exception as exc:  # no internet, proxy, HTTP error: all mean "put the file there yourself"
            raise UserError(f"Inception weights are not on this machine and the download failed ({exc}); "
                            f"put {INCEPTION_FILE} at {hub_file}, pass --weights PATH or set {INCEPTION_ENV}"
                            ) from None
        weights = hub_file
    try:  # torch-fidelity loads with weights_only=False; refuse anything that is not plain tensors first
        safe_torch_load(weights)
    except Exception as exc:
        raise UserError(f"{weights} is not a safe Inception state_dict ({exc}); use {INCEPTION_FILE}") from None
    return weights


def _inception_network(weights: Path, device: str):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                       feature_extractor_weights_path=str(weights)).to(device).eval()


def _inception_cleanfid_model(weights: Path, device: str) -> Callable:
    """The pool3 (2048-d) features of the same network on clean-fid's resized float images.

    torch-fidelity's forward takes uint8 only and resizes itself; clean-fid's protocol hands over
    299x299 float images resized without quantisation, so the layers are applied here directly.
    """
    import torch

    net = _inception_network(weights, device)
    stem = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
            "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
            "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool"]

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (299, 299):
            raise UserError(f"clean-fid Inception features need 299x299 inputs, got {tuple(images.shape[-2:])}")
        x = (images.float() - 128) / 128
        for name in stem:
            x = getattr(net, name)(x)
        return torch.flatten(x, 1)

    return features


FID_EXTRACTORS.register("inception-v3")(FidExtractor(
    name="inception-v3", standard=True, torch_fidelity_name="inception-v3-compat",
    resolve_weights=resolve_inception_weights, cleanfid_model=_inception_cleanfid_model,
    cleanfid_resize=lambda: None))


# --------------------------------------------------------------------------------------------
# digits-cnn (domain extractor for the bundled digits)


def _digits_cnn_network():
    """16x16 grey input -> 64-d penultimate feature -> 10 logits (built lazily: torch imports are heavy)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class DigitsCNN(nn.Module):
        INPUT_SIZE = 16

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
            self.penultimate = nn.Linear(64 * 4 * 4, 64)
            self.head = nn.Linear(64, 10)
            # Fixed after training: the train split's per-dimension mean and std of the penultimate
            # feature, so the features FD/KID see are unit-scale (KID's cubic kernel assumes that).
            self.register_buffer("feature_mean", torch.zeros(64))
            self.register_buffer("feature_std", torch.ones(64))

        def prepare(self, images: torch.Tensor) -> torch.Tensor:
            """Images in [0, 255] (uint8 or float), any size and 1 or 3 channels -> normalised grey 16x16."""
            x = images.float() / 255
            x = x.mean(dim=1, keepdim=True)
            if x.shape[-2:] != (self.INPUT_SIZE, self.INPUT_SIZE):
                x = F.interpolate(x, size=self.INPUT_SIZE, mode="bilinear", align_corners=False, antialias=True)
            return (x - 0.5) / 0.5

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """(standardised penultimate features [B, 64] (before the ReLU), logits [B, 10])."""
            feature = self.penultimate(self.conv(self.prepare(images)).flatten(1))
            return (feature - self.feature_mean) / self.feature_std, self.head(F.relu(feature))

    return DigitsCNN()


def load_digits_cnn(weights: Path, device: str = "cpu"):
    from mage_bench.io import safe_torch_load

    net = _digits_cnn_network()
    try:
        net.load_state_dict(safe_torch_load(weights)["model"])
    except (KeyError, RuntimeError) as exc:
        raise UserError(f"{weights} is not a digits-cnn checkpoint ({str(exc).splitlines()[0]}); "
                        f"delete it and rerun to retrain") from None
    return net.to(device).eval()


def train_digits_cnn(out_dir: str | Path = DIGITS_CNN_DIR, seed: int = 0, epochs: int = 30,
                     progress: bool = False) -> dict[str, Any]:
    """Train the digits classifier on the digits train split (seeded), save weights + card; returns the card.

    Augmentation: random shifts of up to 1 px and small rotations (no flips: they change digits).
    Raises if test accuracy is below DIGITS_CNN_MIN_ACCURACY, so a bad extractor is never cached.
    """
    import sys
    import time

    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from mage_bench.cards import ModelCard, describe_files, write_card
    from mage_bench.config import DataConfig, to_dict
    from mage_bench.data import create_dataset
    from mage_bench.io import atomic_torch_save

    data = DataConfig(name="digits", image_size=16)
    train_x, train_y = create_dataset(data, "train", train_transform=False).tensors()
    test_x, test_y = create_dataset(data, "test", train_transform=False).tensors()
    to_uint8 = lambda x: (x.clamp(0, 1) * 255).round()  # noqa: E731  the extractor's input range
    train_x, test_x = to_uint8(train_x), to_uint8(test_x)

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = _digits_cnn_network()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    steps_per_epoch = (len(train_x) + 63) // 64
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=epochs * steps_per_epoch)
    start = time.perf_counter()
    for _ in tqdm(range(epochs), desc="digits-cnn", unit="epoch", file=sys.stderr, disable=not progress):
        order = torch.randperm(len(train_x), generator=generator)
        for batch in order.split(64):
            images = train_x[batch]
            angle = (torch.rand(len(batch), generator=generator) - 0.5) * 0.3  # +-8.6 degrees
            shift = (torch.randint(-1, 2, (len(batch), 2), generator=generator).float() * 2 / 16)
            theta = torch.stack([torch.stack([angle.cos(), -angle.sin(), shift[:, 0]], 1),
                                 torch.stack([angle.sin(), angle.cos(), shift[:, 1]], 1)], 1)
            grid = F.affine_grid(theta, list(images.shape), align_corners=False)
            images = F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")
            loss = F.cross_entropy(net(images)[1], train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    net.eval()
    with torch.no_grad():
        raw = net.penultimate(net.conv(net.prepare(train_x)).flatten(1))
        net.feature_mean.copy_(raw.mean(0))
        net.feature_std.copy_(raw.std(0).clamp_min(1e-6))
        accuracy = float((net(test_x)[1].argmax(1) == test_y).float().mean())
    if accuracy < DIGITS_CNN_MIN_ACCURACY:
        raise RuntimeError(f"digits-cnn reached only {accuracy:.3f} test accuracy (< {DIGITS_CNN_MIN_ACCURACY})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"model": net.state_dict()}, out / DIGITS_CNN_FILE)
    card = write_card(out, ModelCard(
        kind="extractor", name="digits-cnn", architecture="digits-cnn", config={"data": to_dict(data)},
        files={"weights": DIGITS_CNN_FILE}, sha256=describe_files(out, {"weights": DIGITS_CNN_FILE}),
        origin="trained by mage-bench (seeded) on the digits train split",
        details={"what": "digits classifier for FD/KID/PR (penultimate, 64-d, standardised on the train split) "
                         "and IS (softmax)", "seed": seed, "epochs": epochs, "train_images": len(train_x),
                 "test_images": len(test_x), "test_accuracy": accuracy,
                 "train_time_s": round(time.perf_counter() - start, 2)}))
    return card


def resolve_digits_cnn_weights(path: str | None, progress: bool = False, allow_download: bool = True) -> Path:
    """The digits-cnn weights: given, or cached under models/digits-cnn (trained there on first use, ~15 s
    on the bundled digits; that needs no network, so `allow_download` changes nothing here)."""
    import sys

    if path:
        weights = Path(path)
        if not weights.is_file():
            raise UserError(f"digits-cnn weights {weights} do not exist; omit --weights to train them "
                            f"into {DIGITS_CNN_DIR}")
        return weights
    weights = DIGITS_CNN_DIR / DIGITS_CNN_FILE
    if not weights.is_file():
        print(f"mage-bench: training the digits-cnn feature extractor into {DIGITS_CNN_DIR} (once, ~15 s)",
              file=sys.stderr)
        train_digits_cnn(DIGITS_CNN_DIR, progress=progress)
    return weights


def _digits_cnn_cleanfid_model(weights: Path, device: str) -> Callable:
    import torch

    net = load_digits_cnn(weights, device)

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        return net(images)[0]

    return features


def _digits_cnn_cleanfid_resize() -> Callable:
    from cleanfid.resize import make_resizer

    return make_resizer("PIL", False, "bicubic", (16, 16))


FID_EXTRACTORS.register("digits-cnn")(FidExtractor(
    name="digits-cnn", standard=False, torch_fidelity_name="digits-cnn",
    resolve_weights=resolve_digits_cnn_weights, cleanfid_model=_digits_cnn_cleanfid_model,
    cleanfid_resize=_digits_cnn_cleanfid_resize))

# clip-vit-l-14-336px (CMMD) and dinov2-vit-l-14 (dgm-eval): foundation_extractors.py
for _fields in foundation_extractors.FOUNDATION_EXTRACTORS:
    FID_EXTRACTORS.register(_fields["name"])(FidExtractor(**_fields))


def register_with_torch_fidelity() -> None:
    """Make `digits-cnn` and our DINOv2 torch-fidelity feature extractors (idempotent)."""
    import torch
    import torch_fidelity
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    foundation_extractors.register_foundation_with_torch_fidelity()
    if "digits-cnn" in FEATURE_EXTRACTORS_REGISTRY:
        return

    class DigitsCNNExtractor(FeatureExtractorBase):
        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            if feature_extractor_weights_path is None:
                raise UserError("digits-cnn needs its weights file (feature_extractor_weights_path)")
            self.net = load_digits_cnn(Path(feature_extractor_weights_path))
            self.requires_grad_(False)

        @staticmethod
        def get_provided_features_list():
            return "penultimate", "logits"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "penultimate", "kid": "penultimate", "prc": "penultimate"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)

        def forward(self, images):
            feature, logits = self.net(images)
            named = {"penultimate": feature, "logits": logits}
            return tuple(named[name].float() for name in self.features_list)

    torch_fidelity.register_feature_extractor("digits-cnn", DigitsCNNExtractor)


def write_random_inception_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """torch-fidelity's Inception-v3 (`inception-v3-compat`) with random weights, saved where `--weights`
    can read them: the real network and loading path with meaningless values, for tests and throughput
    benchmarks on machines that cannot fetch the real file. Never for a reported FID.

    Building the extractor would download the official weights: that is bypassed while it is built, then
    every convolution gets Kaiming init (PyTorch's default init makes the 2048-d features vanish)."""
    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as module

    fetch, load = module.load_state_dict_from_url, module.FeatureExtractorInceptionV3.load_state_dict
    module.load_state_dict_from_url = lambda *a, **k: {}
    module.FeatureExtractorInceptionV3.load_state_dict = lambda self, *a, **k: None
    try:
        net = module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        module.load_state_dict_from_url, module.FeatureExtractorInceptionV3.load_state_dict = fetch, load
    generator = torch.Generator().manual_seed(seed)
    for layer in net.modules():
        if isinstance(layer, torch.nn.Conv2d):
            fan_in = layer.weight[0].numel()
            with torch.no_grad():  # Kaiming normal (ReLU gain), from our own generator
                layer.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=generator)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), out)
    return out
