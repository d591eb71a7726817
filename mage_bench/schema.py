"""The config machinery every typed config uses: dataclasses from (partial) mappings, plain dicts back,
precedence (CLI > config file > dataclass defaults), YAML, and key-path errors.

Layers are merged as plain dicts first and only then turned into dataclasses, so a file that says
`tokenizer: {name: vqgan_mage}` starts from that preset, not from the default preset's numbers.
Unknown keys are errors naming the full key path with a "did you mean". This module knows no
particular config: the sections live beside what they configure (`mage_bench.config` for runs,
`mage_bench.mage.presets` for the model) and import it from here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from mage_bench.errors import ConfigError, UserError
from mage_bench.registry import did_you_mean

C = TypeVar("C")


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Check `value` against the type hint, converting only lossless cases (int -> float, list -> tuple)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for alternative in inner[1:]:  # e.g. `int | str` ("auto"): the first alternative the value is
            try:
                return _coerce(value, alternative, path)
            except ConfigError:
                continue
        return _coerce(value, inner[0], path)  # none fits: the first alternative's error
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path} must be a mapping of {hint.__name__} keys, not {type(value).__name__}")
        return from_dict(hint, value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, not {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{path} must have {len(args)} entries, not {len(value)}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path} must be a mapping, not {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path} must be true or false, not {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path} must be an integer, not {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{path} must be a number, not {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path} must be a string, not {value!r}")
    return value


def from_dict(cls: type[C], data: Mapping[str, Any] | None, path: str = "") -> C:
    """Build dataclass `cls` from a (possibly partial) mapping, rejecting unknown keys.

    A class with `preset_defaults(name)` starts from the named preset's values.
    """
    data = dict(data or {})
    if hasattr(cls, "migrate"):  # keys renamed since older run folders were written
        data = cls.migrate(data)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            where = _join(path, str(key))
            raise ConfigError(f"unknown config key {where!r}{did_you_mean(str(key), names)}")
    if hasattr(cls, "preset_defaults") and "name" in data:
        if not isinstance(data["name"], str):
            raise ConfigError(f"{_join(path, 'name')} must be a string, not {data['name']!r}")
        try:
            preset = cls.preset_defaults(data["name"])
        except ConfigError:
            raise
        except Exception as exc:  # registry miss: say which key held the bad name
            raise ConfigError(f"{_join(path, 'name')}: {exc}") from None
        data = {**preset, **data}
    hints = typing.get_type_hints(cls)
    kwargs = {key: _coerce(value, hints[key], _join(path, key)) for key, value in data.items()}
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(path or cls.__name__)
    return obj


def to_dict(obj: Any) -> Any:
    """A plain, YAML/JSON-safe dict (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively overlay `override` on `base` (mappings merge; everything else is replaced)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def resolve_config(cls: type[C], file_layer: Mapping[str, Any] | None = None,
                   cli_layer: Mapping[str, Any] | None = None) -> C:
    """The one implementation of precedence: CLI > config file > dataclass defaults."""
    return from_dict(cls, deep_merge(dict(file_layer or {}), dict(cli_layer or {})))


def require_same_config(stored: Mapping[str, Any], current: Any, where: str,
                        identity: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
    """Resuming needs the config the run started with; name the sections that changed. `identity` maps a
    config dict to what must match (e.g. without settings that change only what is logged)."""
    keep = identity or (lambda data: data)
    stored, now = keep(dict(stored)), keep(to_dict(current))
    if stored != now:
        changed = [k for k in sorted(set(stored) | set(now)) if stored.get(k) != now.get(k)]
        raise UserError(f"the config differs from the one {where} was trained with (sections: "
                        f"{', '.join(changed)}); resume with the same config or choose another --out")


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top, not {type(data).__name__}")
    return data


def dump_yaml(obj: Any) -> str:
    import yaml

    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def cli_layer(**dotted: Any) -> dict[str, Any]:
    """{'train.steps': 5, 'seed': None} -> {'train': {'steps': 5}}; None means 'not given on the CLI'."""
    layer: dict[str, Any] = {}
    for key, value in dotted.items():
        if value is None:
            continue
        node = layer
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return layer
