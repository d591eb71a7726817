"""Sweep specs (experiments/*.yaml): the schema, loading with presets, validation, expansion into runs.

A spec names one swept run-config parameter (`parameter`, e.g. `masking.spec`), its points (each a
`label` and a `value`, plus optional `overrides`), the `seeds`, a base `run` layer, the shared
tokenizer, the evaluation settings and the executor; `presets` overlay any of these. Everything is
checked here, before anything runs, and a typo is a one-line error naming its key path.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mage_bench.config import from_dict, to_dict
from mage_bench.errors import ConfigError, UserError
from mage_bench.io import slug

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
BUILTIN_SPECS = ("masking", "contrastive")


@dataclass(frozen=True)
class SweepPoint:
    label: str = ""
    value: Any = None
    overrides: dict[str, Any] = field(default_factory=dict)  # a run-config layer for this point only


@dataclass(frozen=True)
class TokenizerSource:
    path: str | None = None  # an existing tokenizer folder; else one is trained with `train`
    train: dict[str, Any] = field(default_factory=dict)  # a `tokenizer train` config layer


@dataclass(frozen=True)
class SweepEval:
    num_samples: int | None = None  # generated images per run (default: the reference split's size)
    extractor: str | None = None  # default: digits-cnn for digits, inception-v3 otherwise
    weights: str | None = None
    backend: str = "torch-fidelity"
    real_split: str = "train"
    device: str = "auto"
    references: bool = True  # raw pixels, untrained model, real held-out images

    def validate(self, path: str) -> None:
        if self.num_samples is not None and self.num_samples < 2:
            raise ConfigError(f"{path}.num_samples must be >= 2")
        if self.real_split not in ("train", "test"):
            raise ConfigError(f"{path}.real_split must be train or test")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"{path}.device must be auto, cpu or cuda")


@dataclass(frozen=True)
class SlurmOptions:
    cluster: str | None = None  # submitit's: None = detect (slurm when sbatch exists), "local", "debug"
    partition: str | None = None
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    mem_gb: int = 64
    timeout_min: int = 24 * 60
    nodes: int = 1


@dataclass(frozen=True)
class ExecutorOptions:
    name: str = "local"
    nproc_per_node: int = 2  # torchrun: processes per run
    slurm: SlurmOptions = field(default_factory=SlurmOptions)


@dataclass(frozen=True)
class SweepSpec:
    name: str = ""
    description: str = ""
    parameter: str = ""
    points: tuple[SweepPoint, ...] = ()
    seeds: tuple[int, ...] = (0,)
    run: dict[str, Any] = field(default_factory=dict)
    tokenizer: TokenizerSource = field(default_factory=TokenizerSource)
    eval: SweepEval = field(default_factory=SweepEval)
    executor: ExecutorOptions = field(default_factory=ExecutorOptions)

    def validate(self, path: str) -> None:
        if not self.name or slug(self.name, limit=len(self.name)) != self.name:
            raise ConfigError(f"{path}.name must be lower-case letters, digits, '.', '_' or '-' (got {self.name!r})")
        if not self.points:
            raise ConfigError(f"{path}.points: a sweep needs at least one point")
        labels = [p.label for p in self.points]
        for i, point in enumerate(self.points):
            if not point.label:
                raise ConfigError(f"{path}.points[{i}].label is missing")
        dupes = {label for label in labels if labels.count(label) > 1}
        if dupes:
            raise ConfigError(f"{path}.points: label {sorted(dupes)[0]!r} is used twice")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"{path}.seeds must be a non-empty list of distinct integers")
        if "seed" in self.run:
            raise ConfigError(f"{path}.run.seed: seeds are a sweep axis; list them under seeds")


@dataclass(frozen=True)
class RunPlan:
    name: str  # folder name: safe, deterministic
    point: str  # the point's label (user text: escaped wherever shown)
    value: Any
    seed: int
    config: Any  # RunConfig, resolved against the sweep's tokenizer

    def meta(self, sweep: SweepSpec) -> dict[str, Any]:
        from mage_bench.results import config_hash

        return {"sweep": sweep.name, "run": self.name, "point": self.point, "parameter": sweep.parameter,
                "value": self.value, "seed": self.seed, "config_hash": config_hash(self.config)}


def find_spec(name_or_path: str) -> Path:
    """`masking`/`contrastive` (experiments/NAME.yaml) or a path to a YAML spec."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UserError(f"sweep spec {path} does not exist")
        return path
    for folder in (EXPERIMENTS, Path.cwd() / "experiments"):
        if (folder / f"{name_or_path}.yaml").is_file():
            return folder / f"{name_or_path}.yaml"
    from mage_bench.registry import did_you_mean

    raise UserError(f"unknown sweep {name_or_path!r}{did_you_mean(name_or_path, list(BUILTIN_SPECS))}; "
                    "give masking, contrastive or a path to a .yaml spec")


def load_spec(name_or_path: str, preset: str | None = None) -> SweepSpec:
    """The spec with `preset` (default: its `default_preset`) overlaid, validated. A preset other than
    the default renames the sweep to NAME-PRESET, so presets never share run folders."""
    from mage_bench.config import deep_merge, load_yaml

    path = find_spec(name_or_path)
    raw = load_yaml(path)
    presets = raw.pop("presets", {}) or {}
    default = raw.pop("default_preset", None)
    chosen = preset or default
    if chosen is not None:
        if chosen not in presets:
            from mage_bench.registry import did_you_mean

            raise ConfigError(f"{path}: unknown preset {chosen!r}{did_you_mean(chosen, list(presets))}; "
                              f"presets: {', '.join(presets) or 'none'}")
        raw = deep_merge(raw, presets[chosen])
        if chosen != default and isinstance(raw.get("name"), str):
            # Each preset is its own sweep (own runs, tokenizer and report): masking-digits, not masking.
            raw["name"] = f"{raw['name']}-{chosen}"
    try:
        return from_dict(SweepSpec, raw, "")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _set_dotted(layer: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    node = layer
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return layer


def expand(spec: SweepSpec, tokenizer: str) -> list[RunPlan]:
    """One RunPlan per (point, seed), each with a fully resolved and validated RunConfig."""
    import copy

    from mage_bench.config import RunConfig, deep_merge, resolve_config
    from mage_bench.mage.masking import resolve_masking

    plans = []
    for i, point in enumerate(spec.points):
        layer = deep_merge(copy.deepcopy(spec.run), {"tokenizer": tokenizer})
        layer = _set_dotted(layer, spec.parameter, point.value)
        layer = deep_merge(layer, point.overrides)
        digest = hashlib.sha256(json.dumps([point.label, to_dict(point.value), point.overrides],
                                           sort_keys=True, default=str).encode()).hexdigest()[:6]
        for seed in spec.seeds:
            try:
                config = resolve_config(RunConfig, {**layer, "seed": seed})
                resolve_masking(config.masking.spec, config.masking.mask_ratio_min)  # what training would refuse
            except (ConfigError, UserError, ValueError) as exc:
                raise ConfigError(f"points[{i}] ({point.label!r}): {exc}") from None
            plans.append(RunPlan(f"{slug(point.label)}-{digest}-s{seed}", point.label, point.value, seed, config))
    return plans


def check_parameter(spec: SweepSpec) -> None:
    """The swept parameter must be a leaf of the run config (typos fail with their key path)."""
    from mage_bench.config import RunConfig

    node: Any = to_dict(RunConfig())
    for i, key in enumerate(spec.parameter.split(".")):
        if not isinstance(node, dict) or key not in node:
            from mage_bench.registry import did_you_mean

            options = list(node) if isinstance(node, dict) else []
            raise ConfigError(f"parameter: {spec.parameter!r} is not a run-config key "
                              f"(at {'.'.join(spec.parameter.split('.')[:i + 1])!r}{did_you_mean(key, options)})")
        node = node[key]
