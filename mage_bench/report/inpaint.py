"""The report's masked-reconstruction (inpainting) section: metrics against the mask ratio, and the
original/masked/completed triplets each run saved per mask (never imports torch).

Reads the `inpaint` evaluator's records (RUN/eval/inpaint.json): one per (mask, metric), each with its
mask spec, family and realised ratio (the mean fraction of unknown tokens), the decoding settings and a
`grid` PNG path relative to its run folder.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from mage_bench.eval.extractors import standard_extractors
from mage_bench.eval.inpaint import EVALUATOR, METRICS
from mage_bench.eval.runner import metric_of
from mage_bench.report.figures import png, pyplot, short

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

RANDOM = "random"  # the token-space family whose masks are drawn as one line per point
MARKERS = ("s", "^", "D", "v", "P", "X", "*", "<", ">", "h")  # one per geometric mask spec
DECODING = ("steps", "temperature", "argmax", "paste_back")
REFERENCE_STYLE = {"color": "0.45", "linestyle": "--"}  # reference rows (the untrained model) on every panel
NEEDED = ("mask", "mask_family", "mask_ratio")  # a record without these cannot be placed on the figure
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def inpaint_rows(results: pd.DataFrame, role: str = "run") -> pd.DataFrame:
    """The inpaint records of the sweep runs (`role` "run") or of the reference rows (the untrained model);
    records lacking a mask, its family or its ratio are left out (they cannot be placed)."""
    if results.empty or "evaluator" not in results or any(c not in results for c in NEEDED):
        return results.iloc[0:0]
    rows = results[(results["evaluator"] == EVALUATOR) & (results["role"] == role)]
    return rows.dropna(subset=list(NEEDED))


def mask_order(rows: pd.DataFrame) -> list[str]:
    """Random masks by their mean realised ratio, then the other masks in first-seen order."""
    ratios = rows.groupby("mask", sort=False)["mask_ratio"].mean()
    families = rows.groupby("mask", sort=False)["mask_family"].first()
    random = sorted((m for m in ratios.index if families[m] == RANDOM), key=lambda m: (ratios[m], m))
    return random + [m for m in ratios.index if families[m] != RANDOM]


def panels(rows: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """(metric, feature extractor, its records) per panel, in the declared metric order. A metric computed
    with several extractors gets one panel each: distances in two feature spaces share no scale."""
    out = []
    for metric in METRICS:
        data = rows[rows["metric"] == metric.key]
        for extractor in sorted(set(data["feature_extractor"])):
            out.append((metric.key, extractor, data[data["feature_extractor"] == extractor]))
    return out


def panel_title(metric: str, extractor: str, higher: bool) -> str:
    """The declared label (naming a non-Inception extractor, as the other figures do) and its direction."""
    label = metric_of(EVALUATOR, metric).display({extractor}, standard={extractor} <= standard_extractors())
    return f"{label} {'↑' if higher else '↓'}"


def _setting(column: str, value: Any) -> str:
    if column == "steps":
        return f"{int(value)} steps"
    if column == "temperature":
        return f"temperature {float(value):g}"
    if column == "paste_back":
        return "known pixels pasted back" if bool(value) else "decoded everywhere"
    return "argmax" if bool(value) else "sampled"


def decoding_note(rows: pd.DataFrame) -> str:
    """The decoding settings when every record shares them, else which of them differ."""
    missing = [c for c in DECODING if c not in rows or rows[c].isna().any()]
    if missing:
        return f"decoding settings not recorded on every record ({', '.join(missing)})"
    differ = [c for c in DECODING if rows[c].nunique() > 1]
    if differ:
        return f"decoding settings differ between records ({', '.join(differ)})"
    note = "decoding: " + ", ".join(_setting(c, rows[c].iloc[0]) for c in DECODING)
    dilated = set(rows["dilate"].dropna()) - {0} if "dilate" in rows else set()
    if dilated:  # applies to pixel masks only (token masks record 0)
        note += f"; pixel masks dilated by {', '.join(str(int(d)) for d in sorted(dilated))} token ring(s)"
    return note


def samples_note(rows: pd.DataFrame) -> int | None:
    """The sample count per record when it is the same for all, else None."""
    counts = set(rows["n_samples"])
    return int(counts.pop()) if len(counts) == 1 else None


def _mean_std(values: pd.Series) -> tuple[float, float]:
    return float(values.mean()), float(np.nan_to_num(values.std(ddof=1)))  # one seed: no error bar


def _draw_point(ax: Axes, data: pd.DataFrame, color: str, markers: dict[str, str], linestyle: str = "-") -> None:
    """One point's masks on one panel: the random masks as a line sorted by ratio, the others as markers;
    x and y are means over the point's seeds, error bars their std."""
    by_mask = {mask: group for mask, group in data.groupby("mask", sort=False)}
    line = sorted((_mean_std(g["mask_ratio"])[0], *_mean_std(g["value"]))
                  for g in by_mask.values() if g["mask_family"].iloc[0] == RANDOM)
    if line:
        xs, ys, stds = np.array(line, dtype=float).T
        ax.errorbar(xs, ys, yerr=stds, fmt="o", linestyle=linestyle, color=color, capsize=3, markersize=4,
                    linewidth=1.2)
    for mask, group in by_mask.items():
        if group["mask_family"].iloc[0] == RANDOM:
            continue
        (x, _), (y, std) = _mean_std(group["mask_ratio"]), _mean_std(group["value"])
        ax.errorbar([x], [y], yerr=[std], fmt=markers[mask], color=color, capsize=3, markersize=7,
                    linestyle="none")


def inpaint_figure(results: pd.DataFrame, points: list[str]) -> Figure | None:
    """One panel per inpaint metric (and per extractor of a metric with several): value against the
    realised mask ratio, one colour per sweep point. None without inpaint records of these points."""
    rows = inpaint_rows(results)
    rows = rows[rows["point"].isin(points)]
    present = panels(rows)
    if not present:
        return None
    references = inpaint_rows(results, role="reference")
    references = references[references["mask"].isin(set(rows["mask"]))]
    plt = pyplot()  # selects the Agg backend before anything else of matplotlib is loaded
    from matplotlib.lines import Line2D
    cols = min(3, len(present))
    nrows = int(np.ceil(len(present) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.6 * nrows), squeeze=False)
    colors = {p: f"C{i % 10}" for i, p in enumerate(points)}  # the spec's order, as the other figures
    geometric = [m for m in mask_order(rows) if (rows[rows["mask"] == m]["mask_family"] != RANDOM).all()]
    markers = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(geometric)}
    for ax, (metric, extractor, data) in zip(axes.flat, present, strict=False):
        for p in points:
            if (data["point"] == p).any():
                _draw_point(ax, data[data["point"] == p], colors[p], markers)
        refs = references[(references["metric"] == metric) & (references["feature_extractor"] == extractor)]
        for _, ref in refs.groupby("point", sort=True):
            _draw_point(ax, ref, REFERENCE_STYLE["color"], markers, REFERENCE_STYLE["linestyle"])
        ax.set_title(panel_title(metric, extractor, bool(data["higher_is_better"].iloc[0])), fontsize=9)
        ax.set_xlim(0.0, 1.0)
        ax.set_xlabel("mask ratio (realised fraction of unknown tokens)", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    drawn = [p for p in points if (rows["point"] == p).any()]
    handles = [Line2D([], [], color=colors[p], marker="o", label=short(p)) for p in drawn]
    handles += [Line2D([], [], marker="o", label=short(name), **REFERENCE_STYLE)
                for name in sorted(set(references["point"]))]
    handles += [Line2D([], [], color="0.3", marker=markers[m], linestyle="none", label=short(m, 40))
                for m in geometric]
    fig.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.95), borderaxespad=0)
    fig.suptitle("masked reconstruction against the mask ratio (mean ± std over seeds; lines: random masks)\n"
                 + decoding_note(rows), fontsize=10)
    fig.tight_layout()
    return fig


def inpaint_vs_ratio(results: pd.DataFrame, points: list[str]) -> str | None:
    """The inpaint figure as a base64 PNG (None without inpaint records)."""
    fig = inpaint_figure(results, points)
    return png(fig) if fig is not None else None


def grid_path(folder: Path, grid: Any) -> Path | None:
    """The PNG a record's `grid` names inside its run folder; None for a missing value or one that
    leaves the folder (an absolute path, '..', or a link pointing outside): records are read, not trusted."""
    if not isinstance(grid, str) or not grid:
        return None
    relative = Path(grid)
    if relative.is_absolute() or relative.anchor or ".." in relative.parts:
        return None
    path = (folder / relative).resolve()
    return path if path.is_relative_to(folder.resolve()) else None


def read_png(path: Path | None) -> str | None:
    """A PNG file as base64; None when missing, unreadable or not a PNG (the cell stays empty)."""
    if path is None:
        return None
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return base64.b64encode(data).decode("ascii") if data.startswith(PNG_SIGNATURE) else None


def first_runs(rows: pd.DataFrame, points: list[str]) -> dict[str, dict[str, Any]]:
    """Each point's first run (lowest seed, then name) among those with inpaint records."""
    out = {}
    for p in points:
        runs = rows[rows["point"] == p][["run", "seed"]].drop_duplicates()
        if not runs.empty:
            first = runs.sort_values(["seed", "run"], kind="stable").iloc[0]
            out[p] = {"point": p, "run": first["run"], "seed": int(first["seed"])}
    return out


def triplet_table(results: pd.DataFrame, points: list[str], folders: dict[str, Path]) -> dict[str, Any] | None:
    """Rows = mask specs, columns = sweep points; a cell is the triplet grid of the point's first run
    under that mask (None when it has none). None when no cell has an image."""
    rows = inpaint_rows(results)
    runs = first_runs(rows, points)
    if not runs or "grid" not in rows:
        return None
    table = []
    for mask in mask_order(rows[rows["point"].isin(list(runs))]):
        cells = []
        for run in runs.values():
            grids = rows[(rows["run"] == run["run"]) & (rows["mask"] == mask)]["grid"]
            folder = folders.get(run["run"])
            # Every metric of one mask names the same grid; the first that reads is shown.
            paths = dict.fromkeys(grid_path(folder, g) for g in grids) if folder is not None else {}
            cells.append(next((image for image in map(read_png, paths) if image), None))
        table.append({"mask": mask, "cells": cells})
    if not any(c for row in table for c in row["cells"]):
        return None
    return {"columns": list(runs.values()), "rows": table}


def section(results: pd.DataFrame, points: list[str], folders: dict[str, Path]) -> dict[str, Any] | None:
    """Everything the page's inpainting section shows; None without inpaint records (no section)."""
    rows = inpaint_rows(results)
    rows = rows[rows["point"].isin(points)]
    if rows.empty:
        return None
    return {"figure": inpaint_vs_ratio(results, points), "triplets": triplet_table(results, points, folders),
            "n_samples": samples_note(rows), "decoding": decoding_note(rows), "masks": mask_order(rows)}


__all__ = ["decoding_note", "grid_path", "inpaint_figure", "inpaint_rows", "inpaint_vs_ratio", "mask_order",
           "panels", "section", "triplet_table"]
