"""The report's decoding-sweep section: a profile's metric against the decoding temperature, one line per step
count, one panel per sweep point, the best setting marked (never imports torch).

Reads the records of `eval.decode_grid` (RUN/eval/fid-<profile>-decode.json: `decode_grid` true, with
`decode_steps` and `decode_temperature`). Each profile (name and hash) gets its own figure (numbers of two
profiles never share an axis); the metric drawn is the profile's first. Values are the
mean over seeds, error bars their std (ddof 1), so the best setting is only as sure as the spread beside it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from mage_bench.eval.extractors import standard_extractors
from mage_bench.eval.fid_backends import METRICS
from mage_bench.report.figures import png, pyplot, short

NEEDED = ("decode_grid", "decode_steps", "decode_temperature", "profile", "profile_hash")


def grid_rows(results: pd.DataFrame) -> pd.DataFrame:
    """The decode-grid records of the sweep's runs."""
    if results.empty or any(c not in results for c in NEEDED):
        return results.iloc[0:0]
    flagged = results["decode_grid"].fillna(False).astype(bool)
    return results[flagged & (results["evaluator"] == "fid") & (results["role"] == "run")]


def best_setting(data: pd.DataFrame, higher: bool) -> tuple[int, float, float]:
    """(steps, temperature, mean) of the best mean over seeds."""
    means = data.groupby(["decode_steps", "decode_temperature"])["value"].mean()
    key = means.idxmax() if higher else means.idxmin()
    return int(key[0]), float(key[1]), float(means[key])


def _figure(data: pd.DataFrame, points: list[str], label: str, higher: bool) -> str:
    plt = pyplot()
    present = [p for p in points if (data["point"] == p).any()] or sorted(set(data["point"]))
    cols = min(3, len(present))
    rows = int(np.ceil(len(present) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, point in zip(axes.flat, present, strict=False):
        rows_of = data[data["point"] == point]
        for steps in sorted(set(rows_of["decode_steps"])):
            line = rows_of[rows_of["decode_steps"] == steps].groupby("decode_temperature")["value"]
            mean, std = line.mean(), line.std(ddof=1)
            ax.errorbar(mean.index, mean.values, yerr=np.nan_to_num(std.reindex(mean.index).values), marker="o",
                        capsize=2, label=f"{int(steps)} steps")
        steps, temperature, value = best_setting(rows_of, higher)
        ax.scatter([temperature], [value], marker="*", s=220, color="gold", edgecolors="black", zorder=5,
                   label=f"best: {steps} steps, T={temperature:g}")
        ax.set_title(short(point), fontsize=9)
        ax.set_xlabel("decoding temperature")
        ax.set_ylabel(f"{label} {'↑' if higher else '↓'}", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(present):]:
        ax.set_visible(False)
    fig.tight_layout()
    return png(fig)


def _first_metric(data: pd.DataFrame) -> Any:
    """The profile's first metric (its records' `profile_metrics`), else the first declared one present."""
    declared = {m.key: m for m in METRICS}
    listed = data["profile_metrics"].dropna() if "profile_metrics" in data else pd.Series(dtype=object)
    for key in (str(listed.iloc[0]).split(",") if len(listed) else []):
        if key in declared and (data["metric"] == key).any():
            return declared[key]
    return next(m for m in METRICS if (data["metric"] == m.key).any())


def section(results: pd.DataFrame, points: list[str]) -> list[dict[str, Any]] | None:
    """One figure (and best-setting table) per profile with decode-grid records; None without any."""
    rows = grid_rows(results)
    if rows.empty:
        return None
    out = []
    protocols = list(dict.fromkeys(zip(rows["profile"], rows["profile_hash"], strict=True)))
    for profile, digest in protocols:
        data = rows[(rows["profile"] == profile) & (rows["profile_hash"] == digest)]
        metric = _first_metric(data)
        data = data[data["metric"] == metric.key]
        extractors = set(data["feature_extractor"])
        several = sum(p == profile for p, _ in protocols) > 1
        name = f"{profile} [{str(digest)[:8]}]" if several else profile
        label = f"{metric.display(extractors, standard=extractors <= standard_extractors())} (profile {name})"
        higher = metric.higher_is_better
        best = []
        for point in [p for p in points if (data["point"] == p).any()] or sorted(set(data["point"])):
            steps, temperature, value = best_setting(data[data["point"] == point], higher)
            best.append({"point": point, "steps": steps, "temperature": temperature, "value": f"{value:.4g}"})
        out.append({"profile": name, "label": label, "png": _figure(data, points, label, higher), "best": best,
                    "settings": int(data.groupby(["decode_steps", "decode_temperature"]).ngroups),
                    "seeds": int(data["seed"].nunique()), "n": int(data["n_samples"].max())})
    return out
