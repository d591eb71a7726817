"""The report's tables as plain dicts for the template: summary, differences against the seed spread,
and what differs between the sweep's points (never imports torch)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from mage_bench.report.collate import beyond_noise, headline_label, headlines, seed_spread, select


def fmt(value: float, std: float | None = None) -> str:
    """A number as the tables show it: 3 decimals (1 from 100 on), '–' when missing."""
    if value is None or not np.isfinite(value):
        return "–"
    digits = 3 if abs(value) < 100 else 1
    text = f"{value:.{digits}f}"
    if std is not None and np.isfinite(std):
        text += f" ± {std:.{digits}f}"
    return text


def _run_groups(data: pd.DataFrame, points: list[str]) -> dict[str, pd.Series]:
    """The seeds' values of each sweep point (runs only: reference rows are no competitors)."""
    runs = data[data["role"] == "run"]
    return {p: runs[runs["point"] == p]["value"] for p in points}


def distinct_best(groups: dict[str, pd.Series], higher: bool) -> str | None:
    """The point whose mean is best AND beyond the seed spread from every other point's mean, else None.

    The same t-test as the banner (collate.beyond_noise with the spread pooled over all points), so a
    bold cell never claims a winner where the banner says the points are within noise."""
    present = {p: g for p, g in groups.items() if len(g)}
    if len(present) < 2:
        return None
    means = {p: g.mean() for p, g in present.items()}
    best = (max if higher else min)(means, key=means.get)
    spread, df = seed_spread(list(present.values()))
    rivals = (g for p, g in present.items() if p != best)
    return best if all(beyond_noise(present[best], g, spread, df) for g in rivals) else None


def _interval_text(rows: pd.DataFrame) -> str:
    """' (CI ±w)': the mean half-width of the records' bootstrap 95% intervals (sample-level uncertainty of
    one evaluation, beside the spread over seeds), or '' when they carry none."""
    if rows.empty or "ci_low" not in rows or rows["ci_low"].isna().all():
        return ""
    half = ((rows["ci_high"] - rows["ci_low"]) / 2).mean()
    return f" (CI ±{half:.3g})"


def summary_table(results: pd.DataFrame, points: list[str], references: list[str]) -> dict[str, Any]:
    """Rows = points then references, columns = headline metrics; a cell is marked best only when that
    point beats every other point by more than the seed spread."""
    columns, rows = [], {p: {"label": p, "reference": p in references, "cells": []} for p in points + references}
    for headline in headlines(results):
        data = select(results, headline)
        if data.empty:
            continue
        higher = bool(data["higher_is_better"].iloc[0])
        columns.append({"label": headline_label(headline, set(data["feature_extractor"])),
                        "arrow": "↑" if higher else "↓", "n": int(data["n_samples"].max())})
        best = distinct_best(_run_groups(data, points), higher)
        for p in points + references:
            values = data[data["point"] == p]["value"]
            std = values.std(ddof=1) if len(values) > 1 else None
            rows[p]["cells"].append({"text": fmt(values.mean() if len(values) else np.nan, std)
                                     + _interval_text(data[data["point"] == p]),
                                     "count": len(values), "best": p == best})
    return {"columns": columns, "rows": list(rows.values())}


def noise(results: pd.DataFrame, points: list[str]) -> list[dict[str, Any]]:
    """Per headline metric: which pairs of points differ by more than the seed spread."""
    out = []
    for headline in headlines(results):
        data = select(results, headline)
        data = data[data["role"] == "run"] if not data.empty else data
        if data.empty:
            continue
        groups = _run_groups(data, points)
        spread, df = seed_spread(list(groups.values()))
        pairs, unknown = [], False
        for i, a in enumerate(points):
            for b in points[i + 1:]:
                verdict = beyond_noise(groups[a], groups[b], spread, df)
                if verdict is None:
                    unknown = True
                elif verdict:
                    pairs.append(f"{a} vs {b}")
        out.append({"label": headline_label(headline, set(data["feature_extractor"])), "pairs": pairs,
                    "spread": spread, "df": df, "unknown": unknown, "within_noise": not pairs and not unknown})
    return out


def _text(value: Any) -> str:
    """A config value as one line, as exact as the config holds it (the template escapes it)."""
    if value is None:
        return "–"
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _declared(key: str, names: list[str]) -> str | None:
    """The declared key that `key` is or falls under (a section such as "masking" covers its keys)."""
    return next((name for name in names if key == name or key.startswith(name + ".")), None)


def differs_table(sweep: dict[str, Any]) -> dict[str, Any] | None:
    """sweep.json's "differs" as a table: one row per point; the keys whose values it lists (swept,
    then coupled, each marked by what the spec declared it), then what the resolved configs imply
    (derived). None for sweeps written before it."""
    differs = sweep.get("differs")
    if not differs or not differs.get("table"):
        return None
    entries = differs["table"]
    swept = list(differs.get("swept") or [])
    reasons = {c["key"]: c.get("reason") for c in differs.get("coupled") or []}
    notes: dict[str, int] = {}  # coupled declaration -> its footnote number, in column order
    columns = []
    for key in dict.fromkeys(k for e in entries for k in e.get("values") or {}):
        declared = None if _declared(key, swept) else _declared(key, list(reasons))
        if declared is not None:
            notes.setdefault(declared, len(notes) + 1)
        columns.append({"key": key, "source": "values", "kind": "coupled" if declared is not None else "swept",
                        "reason": reasons.get(declared), "note": notes.get(declared)})
    columns += [{"key": k, "source": "derived", "kind": "derived", "reason": None, "note": None}
                for k in dict.fromkeys(k for e in entries for k in e.get("derived") or {})]
    rows = [{"point": e.get("point"), "cells": [_text((e.get(c["source"]) or {}).get(c["key"])) for c in columns]}
            for e in entries]
    for i, column in enumerate(columns):  # a column equal on every row is shown greyed: it does not differ
        column["varies"] = len({row["cells"][i] for row in rows}) > 1
    return {"columns": columns, "rows": rows,
            "notes": [{"note": n, "key": k, "reason": reasons[k]} for k, n in notes.items()],
            "coupled_same": [k for k in reasons if k not in notes]}
