"""What differs between the points of a sweep: an ablation changes one thing, and the code checks it.

Every point's run config is resolved as training will resolve it (each "auto" replaced: the drop share
of the masking distribution, the augmentation of MAGE-C, ...) and compared key by key. A key other
than the swept ones that differs between points is a confound: the sweep refuses to run, naming the
key and the points, unless the spec declares it under `coupled:` with a reason. What does differ
(swept and coupled keys) and what follows from it (drop share, encoder length, realised mean masking
ratio, augmentation, steps) is returned as a table for `sweep.json`, the dry run and the report.
"""

from __future__ import annotations

import json
from typing import Any

from mage_bench.config import to_dict
from mage_bench.errors import ConfigError

IGNORED = ("seed",)  # seeds are their own axis: every point runs the same seeds


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'masking': {'spec': s}} -> {'masking.spec': s}; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _under(key: str, names: list[str]) -> bool:
    return any(key == name or key.startswith(name + ".") for name in names)


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def resolved_points(plans: list[Any]) -> dict[str, Any]:
    """Point label -> its automatically resolved run config, in plan order.

    The seeds of one point share everything but the seed by construction, so the first stands for all.
    """
    from mage_bench.train import resolve_automatic

    out: dict[str, Any] = {}
    for plan in plans:
        if plan.point not in out:
            out[plan.point] = resolve_automatic(plan.config)
    return out


def flat_config(config: Any) -> dict[str, Any]:
    """A run config as {dotted key: value}, the seed left out."""
    return {k: v for k, v in flatten(to_dict(config)).items() if k not in IGNORED}


def differing_keys(points: dict[str, dict[str, Any]]) -> list[str]:
    keys = sorted({key for flat in points.values() for key in flat})
    return [k for k in keys if len({json.dumps(flat.get(k), sort_keys=True) for flat in points.values()}) > 1]


def derived(config: Any) -> dict[str, Any]:
    """What a reader needs to see beside the keys: quantities that follow from several of them."""
    from mage_bench.mage.masking import num_dropped, realised_mean

    masking, tokens = config.masking, config.model.num_tokens
    floor = masking.mask_ratio_min if masking.clamp_to_drop else 0.0
    return {"drop share": masking.mask_ratio_min,
            "encoder length": 1 + tokens - num_dropped(tokens, masking.mask_ratio_min),
            "mean masking ratio": round(realised_mean(masking.distribution, floor), 4),
            "augmentation": config.train.augment, "steps": config.train.steps}


def check_confounds(spec: Any, plans: list[Any]) -> dict[str, Any]:
    """Refuse a sweep whose points differ in an undeclared key; return what differs, for the record."""
    configs = resolved_points(plans)
    points = {label: flat_config(config) for label, config in configs.items()}
    swept = spec.swept_keys
    coupled = [c.key for c in spec.coupled]
    differing = differing_keys(points)
    hidden = [key for key in differing if not _under(key, swept + coupled)]
    if hidden:
        key = hidden[0]
        seen: dict[str, str] = {}
        for label, flat in points.items():
            seen.setdefault(_show(flat.get(key)), label)
        (value_a, point_a), (value_b, point_b) = list(seen.items())[:2]
        more = f" (and {len(hidden) - 1} more keys: {', '.join(hidden[1:4])})" if len(hidden) > 1 else ""
        raise ConfigError(f"points differ in {key} besides the swept {' and '.join(swept)}: {point_a!r} has "
                          f"{value_a}, {point_b!r} has {value_b}{more}; set it once for every point (e.g. under "
                          f"run:) or declare it under coupled: with a reason")
    # Swept keys first, in the spec's order (shown even where resolved values agree), then the coupled
    # keys that do differ.
    first = next(iter(points.values()))
    shown = list(dict.fromkeys([k for name in swept for k in first if _under(k, [name])]
                               + [k for name in coupled for k in differing if _under(k, [name]) and not _under(k, swept)]))
    return {
        "swept": swept,
        "coupled": [{"key": c.key, "reason": c.reason} for c in spec.coupled],
        "differing": differing,
        "table": [{"point": label, "values": {k: flat.get(k) for k in shown}, "derived": derived(configs[label])}
                  for label, flat in points.items()],
    }


def format_table(differs: dict[str, Any]) -> str:
    """The table as plain text for the dry run."""
    rows = differs["table"]
    if not rows:
        return ""
    value_keys = list(rows[0]["values"])
    derived_keys = list(rows[0]["derived"])
    coupled = {c["key"] for c in differs["coupled"]}
    header = ["point"] + [f"{k} (coupled)" if _under(k, list(coupled)) else k for k in value_keys] + derived_keys
    body = [[r["point"]] + [_show(r["values"][k]) for k in value_keys] + [_show(r["derived"][k]) for k in derived_keys]
            for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
             for line in [header, *body]]
    notes = [f"  coupled {c['key']}: {c['reason']}" for c in differs["coupled"]]
    return "\n".join(["what differs between points:", *lines, *notes])
