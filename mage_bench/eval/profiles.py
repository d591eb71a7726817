"""Evaluation profiles: named, versioned bundles that pin a generation evaluation's whole protocol.

A generation number is only comparable with another computed under the same protocol: the extractor and its
weights, where the resize happens, the file format of both image sets, how many images on each side, the
decoding settings, the reference, the metrics and their parameters. Users of the official code lose days to
one of these drifting (a JPEG reference moved FID 11.2 -> 13.7, LTH14/mage#8; precision against a statistics
file 0.81 -> 0.51, LTH14/mar#91). A profile pins all of it; `PROFILES` holds the built-in ones, users add their
own as YAML (`load_profile`: a file, or a NAME.yaml in a profile folder). Every record computed under a profile
carries its name and `profile_hash` (the sha256 of its pinned settings), and the report never puts numbers of
two profiles in one column or on one axis.

Every metric of a profile is computed from one feature pass per (image set, extractor)
(`feature_sets.image_features`): torch-fidelity's image reader and extractor network, cached on disk, so the
FD of a profile is torch-fidelity's FID of the same images, and a second profile with the same extractor reads
the features back instead of extracting them again.

Torch-free: `mage-bench eval profiles` and the report read profiles without importing torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mage_bench.errors import UserError
from mage_bench.registry import Registry, did_you_mean
from mage_bench.schema import from_dict, load_yaml, require, to_dict

# The metrics a profile may list (the `fid` evaluator's record keys; `fid` is named FD with a non-Inception
# extractor, `kid` KD). IS needs a classifier extractor, CMMD is defined on CLIP but computable on any features.
PROFILE_METRICS = ("fid", "is", "kid", "precision", "recall", "density", "coverage", "cmmd")
# Where the real side comes from: `dataset` (a data set's split, written once as PNGs: the profile's
# `reference_data`, or the run's own data set when that is empty), `folder` (images given with --real, checked
# against the profile's count, size and format) or `statistics` (an .npz of mu/sigma given with --real: FID only,
# and precision/recall/density/coverage when it also holds reference images as `arr_0`, as ADM's batches do).
REFERENCE_KINDS = ("dataset", "folder", "statistics")
IMAGE_FORMATS = ("png",)  # lossless only: the JPEG reference of LTH14/mage#8 is what a profile exists to refuse
CLASS_BALANCE = ("unconditional",)  # MAGE generates unconditionally; class-balanced sampling needs a conditional model
PROFILE_ENV = "MAGE_BENCH_PROFILES"  # folders (os.pathsep-separated) searched for NAME.yaml besides experiments/profiles
PROFILE_DIR = Path("experiments/profiles")
# Settings that document a profile but change no number: left out of its hash.
UNHASHED = ("name", "description")


@dataclass(frozen=True)
class EvalProfile:
    name: str
    description: str
    version: int  # bumped whenever a pinned setting of a built-in profile changes
    extractor: str  # key of `extractors.FID_EXTRACTORS`
    # The extractor weights' sha256 (or its first 8+ hex digits, as torch hub names files); a weights file that
    # does not match is refused. Empty: not pinned (weights made here, e.g. digits-cnn); records carry the file's.
    weights_sha256: str = ""
    metrics: tuple[str, ...] = ("fid",)
    num_samples: int | None = None  # generated images; None: as many as the reference holds
    num_real: int | None = None  # reference images the profile expects; None: whatever the reference holds
    reference: str = "dataset"  # REFERENCE_KINDS
    reference_data: str = ""  # reference "dataset": the data set (empty: the run's own)
    real_split: str = "train"
    reference_sha256: str = ""  # reference "statistics": the file's sha256 (prefix) when pinned
    image_size: int | None = None  # the pixel size both image sets must have; None: the run's
    reference_preparation: str = ""  # how the reference images were made (e.g. "resize 256 bilinear, centre crop")
    image_format: str = "png"  # IMAGE_FORMATS: the generated and the reference images on disk
    class_balance: str = "unconditional"  # CLASS_BALANCE
    decode_steps: int | None = None  # iterative decoding of a run's images; None: the run's generate.steps
    decode_temperature: float | None = None  # None: the run's generate.temperature
    # Metric parameters, pinned
    pr_k: int = 3  # precision/recall neighbours (Kynkäänniemi et al. 2019)
    dc_k: int = 5  # density/coverage neighbours (Naeem et al. 2020)
    kid_subset_size: int = 1000  # at most; min(this, N_real, N_fake) is used and recorded
    kid_subsets: int = 100
    isc_splits: int = 10
    cmmd_sigma: float = 10.0
    cmmd_normalise: bool = True  # CMMD's published code takes unit-norm CLIP embeddings
    bootstrap: int = 100  # resamples for the 95% intervals of FD, KD, CMMD and PRDC (0: none)

    def validate(self, path: str) -> None:
        from mage_bench.eval.extractors import FID_EXTRACTORS

        require(bool(self.name), f"{path}.name must not be empty")
        require(self.version >= 1, f"{path}.version must be >= 1")
        require(self.extractor in FID_EXTRACTORS,
                f"{path}.extractor: unknown extractor {self.extractor!r}; choose one of: "
                f"{', '.join(FID_EXTRACTORS.names())}")
        require(bool(self.metrics), f"{path}.metrics must name at least one of {', '.join(PROFILE_METRICS)}")
        for metric in self.metrics:
            require(metric in PROFILE_METRICS, f"{path}.metrics: unknown metric {metric!r}"
                    f"{did_you_mean(metric, PROFILE_METRICS)}; use {', '.join(PROFILE_METRICS)}")
        require(len(set(self.metrics)) == len(self.metrics), f"{path}.metrics lists a metric twice")
        if "is" in self.metrics:
            require(FID_EXTRACTORS.get(self.extractor).classifier,
                    f"{path}.metrics: IS needs a classifier extractor (inception-v3, digits-cnn), not {self.extractor}")
        require(self.reference in REFERENCE_KINDS, f"{path}.reference must be one of {', '.join(REFERENCE_KINDS)}")
        require(not self.reference_data or self.reference == "dataset",
                f"{path}.reference_data applies to reference: dataset only")
        require(not self.reference_sha256 or self.reference == "statistics",
                f"{path}.reference_sha256 applies to reference: statistics only")
        require(self.real_split in ("train", "test"), f"{path}.real_split must be train or test")
        require(self.image_format in IMAGE_FORMATS, f"{path}.image_format must be png (a lossy reference changes "
                                                    "FID: LTH14/mage#8)")
        require(self.class_balance in CLASS_BALANCE,
                f"{path}.class_balance must be unconditional (MAGE samples without class labels)")
        for name in ("num_samples", "num_real", "image_size", "decode_steps"):
            value = getattr(self, name)
            require(value is None or value >= 1, f"{path}.{name} must be >= 1")
        require(self.num_samples is None or self.num_samples >= 2, f"{path}.num_samples must be >= 2")
        require(self.decode_temperature is None or self.decode_temperature >= 0,
                f"{path}.decode_temperature must be >= 0")
        for name in ("pr_k", "dc_k", "kid_subsets", "isc_splits"):
            require(getattr(self, name) >= 1, f"{path}.{name} must be >= 1")
        require(self.kid_subset_size >= 2, f"{path}.kid_subset_size must be >= 2")
        require(self.cmmd_sigma > 0, f"{path}.cmmd_sigma must be > 0")
        require(self.bootstrap == 0 or self.bootstrap >= 10, f"{path}.bootstrap must be 0 (none) or >= 10")
        for name in ("weights_sha256", "reference_sha256"):
            digest = getattr(self, name)
            require(not digest or (len(digest) >= 8 and all(c in "0123456789abcdef" for c in digest)),
                    f"{path}.{name} must be a lowercase hex sha256 (or its first 8+ digits)")
        if self.reference == "statistics":
            require("is" not in self.metrics and "kid" not in self.metrics and "cmmd" not in self.metrics,
                    f"{path}.metrics: a statistics reference gives fid (and, with reference images inside, "
                    "precision/recall/density/coverage), not is, kid or cmmd")

    @property
    def settings(self) -> dict[str, Any]:
        """The pinned settings: everything but the name and description."""
        return {k: v for k, v in to_dict(self).items() if k not in UNHASHED}

    @property
    def hash(self) -> str:
        """sha256 (16 hex digits) of the pinned settings as canonical JSON: what records carry as `profile_hash`."""
        return hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def standard(self) -> bool:
        from mage_bench.eval.extractors import FID_EXTRACTORS

        return FID_EXTRACTORS.get(self.extractor).standard

    def describe(self) -> dict[str, Any]:
        """What `eval profiles --json` prints for it."""
        return {"name": self.name, "hash": self.hash, "description": self.description, "standard": self.standard,
                **self.settings}


PROFILES: Registry[EvalProfile] = Registry("evaluation profile")


def _builtin(**fields: Any) -> None:
    profile = EvalProfile(**fields)
    profile.validate(f"profile {profile.name}")
    PROFILES.register(profile.name)(profile)


# The paper's protocol (REFERENCE.md, "Evaluation protocols"): torch-fidelity Inception on 50k generated images
# against the 50k ImageNet val images resized to 256 (bilinear) and centre-cropped, stored as PNG; the README's
# FID runs decode with 20 steps at temperature 6.0.
_builtin(name="mage-paper", version=1,
         description="MAGE paper: Inception FID + IS, 50k samples vs the 50k ImageNet val PNGs at 256 px",
         extractor="inception-v3", weights_sha256="6726825d", metrics=("fid", "is"), num_samples=50_000,
         num_real=50_000, reference="folder", image_size=256,
         reference_preparation="ImageNet val, resize 256 bilinear + centre crop 256, PNG (prepare_imgnet_val.py)",
         decode_steps=20, decode_temperature=6.0, bootstrap=0)
# The ADM suite's reference batch (VIRTUAL_imagenet256_labeled.npz): FID from its mu/sigma, precision/recall
# against its 10k reference images (`arr_0`), never against the statistics (LTH14/mar#91).
_builtin(name="adm", version=1,
         description="ADM suite: Inception FID from the reference batch's statistics, precision/recall against "
                     "its 10k reference images (the RCG/MAR protocol)",
         extractor="inception-v3", weights_sha256="6726825d", metrics=("fid", "precision", "recall"),
         num_samples=50_000, reference="statistics", image_size=256,
         reference_preparation="ADM reference batch .npz (mu, sigma, arr_0: 10k uint8 images)",
         decode_steps=20, decode_temperature=6.0, bootstrap=0)
# dgm-eval (Stein et al. 2023): DINOv2 ViT-L/14 features rank models as humans do far better than Inception.
# Meta publishes no checksum of dinov2_vitl14_pretrain.pth: the weights are not pinned (records carry the sha256
# of the file used; a user profile `base: dgm-eval` can pin it).
_builtin(name="dgm-eval", version=1,
         description="dgm-eval: DINOv2 ViT-L/14 FD, KD, precision/recall (k=3), density/coverage (k=5)",
         extractor="dinov2-vit-l-14", metrics=("fid", "kid", "precision", "recall", "density", "coverage"),
         num_samples=50_000, reference="folder", decode_steps=20, decode_temperature=6.0, bootstrap=100)
# CMMD (Jayasumana et al. 2024): CLIP ViT-L/14-336 embeddings, Gaussian-kernel MMD, sigma 10, x1000.
_builtin(name="cmmd", version=1,
         description="CMMD: CLIP ViT-L/14-336 embeddings (unit norm), Gaussian RBF MMD (sigma 10, x1000, biased "
                     "estimator); torch-fidelity's resize to 336 (TF1 bilinear), not the published code's bicubic "
                     "centre crop",
         extractor="clip-vit-l-14-336px", metrics=("cmmd",),
         # OpenAI's ViT-L-14-336px.pt: the sha256 its download URL names and its loader checks
         weights_sha256="3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02", num_samples=30_000, reference="folder",
         decode_steps=20, decode_temperature=6.0, bootstrap=100)
# The bundled digits: the digits-cnn classifier (trained here), never "FID". Every metric, all on CPU.
_builtin(name="digits", version=1,
         description="bundled digits: digits-cnn FD, IS, KD, precision/recall, density/coverage (non-standard "
                     "extractor; numbers comparable only with other digits-profile numbers)",
         extractor="digits-cnn", metrics=("fid", "is", "kid", "precision", "recall", "density", "coverage"),
         reference="dataset", reference_data="digits", real_split="train", bootstrap=100)


def profile_folders() -> list[Path]:
    """Where user profiles are looked up by name: $MAGE_BENCH_PROFILES (os.pathsep-separated), then
    experiments/profiles under the working directory."""
    env = [Path(p) for p in os.environ.get(PROFILE_ENV, "").split(os.pathsep) if p]
    return [*env, PROFILE_DIR]


def profile_from_yaml(path: str | Path) -> EvalProfile:
    """A user profile from YAML: every EvalProfile field, or `base: NAME` (a built-in) plus the fields that
    differ. `name` defaults to the file's stem; a user profile may not take a built-in's name."""
    path = Path(path)
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of profile settings")
    base = data.pop("base", None)
    fields: dict[str, Any] = {}
    if base is not None:
        fields = {k: v for k, v in dataclasses.asdict(PROFILES.get(str(base))).items() if k not in UNHASHED}
        fields["description"] = f"{base} with " + ", ".join(f"{k}: {v}" for k, v in sorted(data.items())
                                                            if k not in UNHASHED)
    fields.update(data)
    fields.setdefault("name", path.stem)
    fields.setdefault("description", "")
    fields.setdefault("version", 1)
    if fields["name"] in PROFILES:
        raise UserError(f"{path}: name {fields['name']!r} is a built-in profile; give yours another name")
    missing = {"extractor"} - set(fields)
    if missing:
        raise UserError(f"{path} lacks `extractor` (or `base: NAME` of a built-in profile to start from)")
    profile = from_dict(EvalProfile, fields, f"profile {path.name}")
    profile.validate(f"profile {path.name}")
    return profile


def load_profile(name: str) -> EvalProfile:
    """A built-in profile, a YAML file, or NAME.yaml in a profile folder (`profile_folders`)."""
    if name in PROFILES:
        return PROFILES.get(name)
    if name.endswith((".yaml", ".yml")):
        if not Path(name).is_file():
            raise UserError(f"profile file {name} does not exist")
        return profile_from_yaml(name)
    for folder in profile_folders():
        for suffix in (".yaml", ".yml"):
            if (folder / f"{name}{suffix}").is_file():
                return profile_from_yaml(folder / f"{name}{suffix}")
    known = PROFILES.names() + sorted(user_profiles())
    raise UserError(f"unknown evaluation profile {name!r}{did_you_mean(name, known)}; choose one of: "
                    f"{', '.join(known)} (or a FILE.yaml; `mage-bench eval profiles` lists them)")


def user_profiles() -> dict[str, Path]:
    """name -> file of every user profile found in the profile folders (the first folder wins a name)."""
    found: dict[str, Path] = {}
    for folder in profile_folders():
        if folder.is_dir():
            for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
                found.setdefault(path.stem, path)
    return found


def all_profiles() -> list[tuple[EvalProfile, str]]:
    """(profile, where it comes from) for every built-in and user profile; a broken user file is an error."""
    out = [(PROFILES.get(name), "built-in") for name in PROFILES.names()]
    out += [(profile_from_yaml(path), str(path)) for name, path in user_profiles().items() if name not in PROFILES]
    return out
