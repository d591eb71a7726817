"""Sweep specs (experiments/*.yaml): the schema, loading with presets, validation, expansion into runs.

A spec names one swept run-config parameter (`parameter`, e.g. `masking.spec`) with its points (each a
`label` and a `value`, plus optional `overrides`), or several under `parameters` (a grid: their full
product, one run per cell and seed); `coupled` keys (allowed to differ between points, each with a
reason); the `seeds`, a base `run` layer, the shared tokenizer, the evaluation settings and the
executor; `presets` overlay any of these. Everything is checked here, before anything runs, and a typo
is a one-line error naming its key path. What may differ between points is checked in
`mage_bench.confounds`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mage_bench.config import EvalConfig, from_dict, to_dict
from mage_bench.errors import ConfigError, UserError
from mage_bench.io import slug

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
BUILTIN_SPECS = ("masking", "contrastive", "drop", "masking-x-contrastive")


@dataclass(frozen=True)
class SweepPoint:
    label: str = ""
    value: Any = None
    overrides: dict[str, Any] = field(default_factory=dict)  # a run-config layer for this point only


@dataclass(frozen=True)
class SweepAxis:
    """One swept run-config key and its points; a grid has several."""

    parameter: str = ""
    points: tuple[SweepPoint, ...] = ()

    def validate(self, path: str) -> None:
        if not self.parameter:
            raise ConfigError(f"{path}.parameter is missing")
        if not self.points:
            raise ConfigError(f"{path}.points: a sweep needs at least one point")
        labels = [p.label for p in self.points]
        for i, point in enumerate(self.points):
            if not point.label:
                raise ConfigError(f"{path}.points[{i}].label is missing")
        dupes = {label for label in labels if labels.count(label) > 1}
        if dupes:
            raise ConfigError(f"{path}.points: label {sorted(dupes)[0]!r} is used twice")


@dataclass(frozen=True)
class CoupledKey:
    """A run-config key (or section) allowed to differ between points, with the reason it must."""

    key: str = ""
    reason: str = ""

    def validate(self, path: str) -> None:
        if not self.key or not self.reason.strip():
            raise ConfigError(f"{path}: a coupled key needs both `key` and a one-line `reason`")


CELL_SEPARATOR = " × "  # joins the axis labels of a grid cell into its point label


@dataclass(frozen=True)
class TokenizerSource:
    path: str | None = None  # an existing tokenizer folder; else one is trained with `train`
    train: dict[str, Any] = field(default_factory=dict)  # a `tokenizer train` config layer


@dataclass(frozen=True)
class SlurmOptions:
    cluster: str | None = None  # submitit's: None = detect (slurm when sbatch exists), "local", "debug"
    partition: str | None = None
    gpus_per_node: int = 1
    # Training processes (Slurm tasks) per node: None = one per GPU, or one when no GPU is asked for.
    # Every task of a job joins one DDP process group: a run trains on nodes x tasks_per_node processes.
    tasks_per_node: int | None = None
    cpus_per_task: int = 8
    mem_gb: int = 64
    timeout_min: int = 24 * 60
    nodes: int = 1

    def validate(self, path: str) -> None:
        if self.nodes < 1 or self.gpus_per_node < 0 or (self.tasks_per_node is not None and self.tasks_per_node < 1):
            raise ConfigError(f"{path}: nodes >= 1, gpus_per_node >= 0 and tasks_per_node >= 1 are required")

    @property
    def tasks(self) -> int:
        """Tasks per node as launched."""
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1


@dataclass(frozen=True)
class ExecutorOptions:
    name: str = "local"
    nproc_per_node: int = 2  # torchrun: processes per run
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    # local: runs carried out side by side, each in its own process ("auto": the CPU cores / threads on the
    # CPU, one on a GPU). Tiny models use several cores better as several runs than as one run's threads.
    workers: int | str = 1
    # local, on the CPU: torch threads of each run (None: torch's default, every core). A run's last bits
    # depend on its thread count (kernels split their work by it), so it is fixed here and recorded in each
    # run's launch.json, never derived from how many runs are left.
    threads: int | None = None

    def validate(self, path: str) -> None:
        if isinstance(self.workers, str) and self.workers != "auto" or \
                isinstance(self.workers, int) and self.workers < 1:
            raise ConfigError(f"{path}.workers must be a positive integer or 'auto', not {self.workers!r}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"{path}.threads must be a positive integer (or null for torch's default), "
                              f"not {self.threads}")


@dataclass(frozen=True)
class SweepSpec:
    name: str = ""
    description: str = ""
    parameter: str = ""
    points: tuple[SweepPoint, ...] = ()
    parameters: tuple[SweepAxis, ...] = ()  # a grid, instead of parameter + points
    coupled: tuple[CoupledKey, ...] = ()
    seeds: tuple[int, ...] = (0,)
    run: dict[str, Any] = field(default_factory=dict)
    tokenizer: TokenizerSource = field(default_factory=TokenizerSource)
    eval: EvalConfig = field(default_factory=EvalConfig)  # the evaluation settings, as on the CLI
    executor: ExecutorOptions = field(default_factory=ExecutorOptions)

    def validate(self, path: str) -> None:
        if not self.name or slug(self.name, limit=len(self.name)) != self.name:
            raise ConfigError(f"{path}.name must be lower-case letters, digits, '.', '_' or '-' (got {self.name!r})")
        if self.parameters and (self.parameter or self.points):
            raise ConfigError(f"{path}: give either parameter + points (one axis) or parameters (a grid), not both")
        if not self.parameters and not self.points:
            raise ConfigError(f"{path}.points: a sweep needs at least one point")
        for i, axis in enumerate(self.axes):
            axis.validate(f"{path}.parameters[{i}]" if self.parameters else path)
        swept = self.swept_keys
        if len(set(swept)) != len(swept):
            raise ConfigError(f"{path}.parameters: a parameter is listed twice ({', '.join(swept)})")
        for i, coupled in enumerate(self.coupled):
            coupled.validate(f"{path}.coupled[{i}]")
            if coupled.key in swept:
                raise ConfigError(f"{path}.coupled[{i}]: {coupled.key!r} is swept already; list only other keys")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"{path}.seeds must be a non-empty list of distinct integers")
        if "seed" in self.run:
            raise ConfigError(f"{path}.run.seed: seeds are a sweep axis; list them under seeds")


    @property
    def axes(self) -> tuple[SweepAxis, ...]:
        return self.parameters or (SweepAxis(self.parameter, self.points),)

    @property
    def swept_keys(self) -> list[str]:
        return [axis.parameter for axis in self.axes]

    @property
    def parameter_label(self) -> str:
        """The swept parameter(s), for tables and titles."""
        return CELL_SEPARATOR.join(self.swept_keys)

    def cells(self) -> list[dict[str, SweepPoint]]:
        """Every point of the sweep: {parameter: its point}, the first axis varying slowest."""
        keys = self.swept_keys
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(a.points for a in self.axes))]


@dataclass(frozen=True)
class RunPlan:
    name: str  # folder name: safe, deterministic
    point: str  # the point's label (user text: escaped wherever shown); a grid cell's labels joined
    value: Any  # the swept value; a grid cell's {parameter: value}
    seed: int
    config: Any  # RunConfig, resolved against the sweep's tokenizer
    axes: dict[str, str] = field(default_factory=dict)  # parameter -> this point's label on that axis

    def meta(self, sweep: SweepSpec) -> dict[str, Any]:
        from mage_bench.results import config_hash

        return {"sweep": sweep.name, "run": self.name, "point": self.point, "parameter": sweep.parameter_label,
                "value": self.value, "axes": self.axes, "seed": self.seed, "config_hash": config_hash(self.config)}


def find_spec(name_or_path: str) -> Path:
    """A built-in sweep (experiments/NAME.yaml, e.g. masking, drop) or a path to a YAML spec."""
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
                    f"give one of {', '.join(BUILTIN_SPECS)} or a path to a .yaml spec")


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


def _point_digest(cell: dict[str, SweepPoint]) -> str:
    """Six hex digits naming a point's content; a one-axis point keeps the digest it always had."""
    parts = [[p.label, to_dict(p.value), p.overrides] for p in cell.values()]
    return hashlib.sha256(json.dumps(parts[0] if len(parts) == 1 else parts, sort_keys=True,
                                     default=str).encode()).hexdigest()[:6]


def expand(spec: SweepSpec, tokenizer: str) -> list[RunPlan]:
    """One RunPlan per (point, seed), each with a fully resolved and validated RunConfig."""
    import copy

    from mage_bench.config import RunConfig, deep_merge, resolve_config
    from mage_bench.train import resolve_automatic

    plans = []
    for i, cell in enumerate(spec.cells()):
        layer = deep_merge(copy.deepcopy(spec.run), {"tokenizer": tokenizer})
        for parameter, point in cell.items():
            layer = _set_dotted(layer, parameter, point.value)
        for point in cell.values():
            layer = deep_merge(layer, point.overrides)
        label = CELL_SEPARATOR.join(p.label for p in cell.values())
        if any(plan.point == label for plan in plans):  # e.g. "a × b" + "c" and "a" + "b × c"
            raise ConfigError(f"points[{i}]: the grid label {label!r} is made twice; change a point's label")
        value = next(iter(cell.values())).value if len(cell) == 1 else {k: p.value for k, p in cell.items()}
        name = f"{slug(label)}-{_point_digest(cell)}"
        for seed in spec.seeds:
            try:
                config = resolve_config(RunConfig, {**layer, "seed": seed})
                resolve_automatic(config)  # what training would refuse
            except (ConfigError, UserError, ValueError) as exc:
                raise ConfigError(f"points[{i}] ({label!r}): {exc}") from None
            plans.append(RunPlan(f"{name}-s{seed}", label, value, seed, config,
                                 {k: p.label for k, p in cell.items()}))
    return plans


def check_parameter(spec: SweepSpec) -> None:
    """Swept and coupled keys must exist in the run config (typos fail with their key path); either may
    name a whole section (e.g. `coupled: [{key: model, ...}]`)."""
    for key in spec.swept_keys:
        _check_key(key, "parameter")
    for coupled in spec.coupled:
        _check_key(coupled.key, "coupled")


def _check_key(dotted: str, where: str) -> None:
    from mage_bench.config import RunConfig

    node: Any = to_dict(RunConfig())
    parts = dotted.split(".")
    for i, key in enumerate(parts):
        if not isinstance(node, dict) or key not in node:
            from mage_bench.registry import did_you_mean

            options = list(node) if isinstance(node, dict) else []
            raise ConfigError(f"{where}: {dotted!r} is not a run-config key "
                              f"(at {'.'.join(parts[:i + 1])!r}{did_you_mean(key, options)})")
        node = node[key]
