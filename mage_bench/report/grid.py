"""Grid sweeps (several swept parameters, their full product): the axes from sweep.json, statistics per
grid cell and per axis, and their figures: heat maps (2 axes) and main effects (2 axes or more).

Rows are matched to cells through results.csv's `axis:<parameter>` columns (collate), never by
parsing the combined point label, which is user text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from mage_bench.report.collate import Headline, axis_column, headline_label, headlines, seed_spread, select
from mage_bench.report.figures import DPI, png, pyplot, short
from mage_bench.report.tables import fmt

if TYPE_CHECKING:  # matplotlib is imported only when a figure is drawn
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class Axis:
    """One swept parameter of a grid and its point labels, in the spec's order."""

    parameter: str
    labels: tuple[str, ...]

    @property
    def column(self) -> str:
        return axis_column(self.parameter)


def axes_of(sweep: dict[str, Any]) -> list[Axis]:
    """The sweep's axes (sweep.json "axes"); empty for a sweep written before grids existed."""
    return [Axis(a["parameter"], tuple(p["label"] for p in a["points"])) for a in sweep.get("axes") or []]


def _headline_runs(results: pd.DataFrame, axes: list[Axis]) -> list[tuple[Headline, pd.DataFrame]]:
    """Per headline metric present: its run rows whose labels are on every axis of the spec."""
    if results.empty or any(a.column not in results for a in axes):
        return []
    on_grid = results["role"] == "run"
    for axis in axes:
        on_grid &= results[axis.column].isin(axis.labels)
    out = []
    for headline in headlines(results):
        data = select(results[on_grid], headline)
        if not data.empty:
            out.append((headline, data))
    return out


def cells(data: pd.DataFrame, axes: list[Axis]) -> pd.DataFrame:
    """mean, std (ddof 1) and count over seeds for each grid cell (one combination of axis labels)."""
    return data.groupby([a.column for a in axes])["value"].agg(["mean", "std", "count"])


def main_effect(data: pd.DataFrame, axes: list[Axis], axis: Axis) -> pd.Series:
    """Per label of `axis`: the mean of its cells' means over the other axes (each cell weighs the same,
    whatever its seed count), in the spec's order."""
    return cells(data, axes)["mean"].groupby(level=axis.column).mean().reindex(list(axis.labels))


def cell_spread(data: pd.DataFrame, axes: list[Axis]) -> float:
    """The seed-to-seed std pooled over all cells (collate.seed_spread); NaN with one seed per cell."""
    groups = [g for _, g in data.groupby([a.column for a in axes])["value"]]
    return seed_spread(groups)[0]


def _title(headline: Headline, data: pd.DataFrame) -> tuple[str, bool]:
    higher = bool(data["higher_is_better"].iloc[0])
    return f"{headline_label(headline, set(data['feature_extractor']))} {'↑' if higher else '↓'}", higher


def _ink(rgba: tuple[float, ...]) -> str:
    """Black on light cells, white on dark ones (relative luminance)."""
    red, green, blue = rgba[:3]
    return "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"


def heat_map_figure(data: pd.DataFrame, rows: Axis, cols: Axis, title: str, higher: bool) -> Figure | None:
    """Mean over seeds per cell, annotated mean ± seed std; brighter is better whatever the metric's
    direction (the colour map is reversed for lower-is-better metrics). None without any cell value."""
    table = cells(data, [rows, cols])

    def grid(stat: str) -> np.ndarray:
        wide = table[stat].unstack(cols.column)
        return wide.reindex(index=list(rows.labels), columns=list(cols.labels)).to_numpy(float)

    mean, std = grid("mean"), grid("std")
    if not np.isfinite(mean).any():
        return None
    plt = pyplot()
    cmap = plt.get_cmap("viridis" if higher else "viridis_r").with_extremes(bad="0.88")
    fig, ax = plt.subplots(figsize=(2.4 + 1.3 * len(cols.labels), 1.4 + 0.55 * len(rows.labels)), dpi=DPI)
    image = ax.imshow(np.ma.masked_invalid(mean), cmap=cmap, aspect="auto")
    for i in range(len(rows.labels)):
        for j in range(len(cols.labels)):
            finite = np.isfinite(mean[i, j])
            ax.text(j, i, fmt(mean[i, j], std[i, j]) if finite else "no runs", ha="center", va="center",
                    fontsize=8, color=_ink(cmap(image.norm(mean[i, j]))) if finite else "0.3")
    ax.set_xticks(range(len(cols.labels)), [short(label) for label in cols.labels], rotation=25, ha="right",
                  fontsize=8)
    ax.set_yticks(range(len(rows.labels)), [short(label) for label in rows.labels], fontsize=8)
    ax.set_xlabel(short(cols.parameter, 60))
    ax.set_ylabel(short(rows.parameter, 60))
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax).set_label("mean over seeds (brighter is better)", fontsize=8)
    return fig


def heat_maps(results: pd.DataFrame, axes: list[Axis]) -> list[dict[str, str]]:
    """One heat map per headline metric of a 2-axis grid (rows: first axis, columns: second)."""
    if len(axes) != 2:
        return []
    out = []
    for headline, data in _headline_runs(results, axes):
        title, higher = _title(headline, data)
        figure = heat_map_figure(data, axes[0], axes[1], title, higher)
        if figure is not None:
            out.append({"metric": title, "png": png(figure)})
    return out


def main_effects(results: pd.DataFrame, axes: list[Axis]) -> list[dict[str, str]]:
    """Per axis, one figure with a panel per headline metric: its main effect with error bars of ± the
    pooled seed spread, and each cell's mean (over seeds) as a faint dot, which shows how much the
    other axes move it."""
    present = _headline_runs(results, axes)
    if len(axes) < 2 or not present:
        return []
    plt = pyplot()
    out = []
    for axis in axes:
        cols = min(4, len(present))
        rows = int(np.ceil(len(present) / cols))
        fig, panels = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False, dpi=DPI)
        x = np.arange(len(axis.labels))
        for ax, (headline, data) in zip(panels.flat, present, strict=False):
            spread = cell_spread(data, axes)
            effect = main_effect(data, axes, axis)
            cell_means = cells(data, axes)["mean"]
            positions = [axis.labels.index(label) for label in cell_means.index.get_level_values(axis.column)]
            ax.scatter(positions, cell_means.to_numpy(), s=12, color="0.55", alpha=0.6, label="cell means")
            ax.errorbar(x, effect.to_numpy(float), yerr=np.nan_to_num(np.full(len(x), spread)), fmt="o-",
                        capsize=4, color="tab:blue", label="main effect ± seed spread")
            ax.set_title(_title(headline, data)[0], fontsize=9)
            ax.set_xticks(x, [short(label) for label in axis.labels], rotation=30, ha="right", fontsize=7)
            ax.grid(alpha=0.3)
        for ax in list(panels.flat)[len(present):]:
            ax.axis("off")
        panels.flat[0].legend(fontsize=6, loc="best")
        fig.suptitle(f"main effect of {short(axis.parameter, 60)} (mean over the other axes and seeds)",
                     fontsize=10)
        fig.tight_layout()
        out.append({"parameter": axis.parameter, "png": png(fig)})
    return out
