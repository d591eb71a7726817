"""Matplotlib figures of a report, returned as base64 PNG strings (embedded: the page is self-contained)."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from mage_bench.io import read_jsonl
from mage_bench.report.collate import HEADLINES, Headline, headline_label, headlines, select
from mage_bench.report.labels import place_labels
from mage_bench.runs import METRICS_FILE

if TYPE_CHECKING:  # matplotlib is imported only when a figure is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.legend import Legend

DPI = 110  # figures are drawn and saved at one dpi, so text extents measured while drawing hold in the PNG
NAME_REACH_PX = 20.0  # a name farther than this from its point would be read as another's: number instead


def png(fig: Figure) -> str:
    """The figure as a base64 PNG (closed afterwards)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display; imported only when a figure is drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, ax, xlabel: str, ylabel: str, title: str) -> str:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return png(fig)


def short(label: str, limit: int = 28) -> str:
    """A user label fit for a figure: shortened, and '$' escaped so matplotlib never parses it as math."""
    label = label if len(label) <= limit else label[: limit - 1] + "…"
    return label.replace("$", r"\$")


def metrics_vs_parameter(results: pd.DataFrame, points: list[str], parameter: str) -> str | None:
    """One panel per headline metric: mean +- std over seeds per point, seeds as dots, references as lines."""
    plt = pyplot()
    present = [h for h in headlines(results) if not select(results, h).empty]
    if not present or not points:
        return None
    cols = min(4, len(present))
    rows = int(np.ceil(len(present) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    x = np.arange(len(points))
    styles = {"reference: untrained model": ("0.4", "--"), "reference: raw pixels": ("tab:green", ":"),
              "reference: real held-out images": ("tab:olive", ":")}
    for ax, headline in zip(axes.flat, present, strict=False):
        data = select(results, headline)
        runs = data[data["role"] == "run"]
        means = [runs[runs["point"] == p]["value"].mean() for p in points]
        stds = [runs[runs["point"] == p]["value"].std(ddof=1) for p in points]
        ax.errorbar(x, means, yerr=np.nan_to_num(stds), fmt="o", capsize=4, color="tab:blue", label="mean ± std (seeds)")
        for i, p in enumerate(points):
            seeds = runs[runs["point"] == p]["value"]
            ax.scatter(np.full(len(seeds), i) + 0.12, seeds, s=10, color="tab:blue", alpha=0.4)
        for name, (color, style) in styles.items():
            ref = data[(data["role"] == "reference") & (data["point"] == name)]["value"]
            if not ref.empty:
                ax.axhline(ref.mean(), color=color, linestyle=style, linewidth=1, label=name.split(": ")[1])
        arrow = "↑" if data["higher_is_better"].iloc[0] else "↓"
        ax.set_title(f"{headline_label(headline, set(data['feature_extractor']))} {arrow}", fontsize=9)
        ax.set_xticks(x, [short(p) for p in points], rotation=35, ha="right", fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6, loc="best")
    first_generation = next((i for i, h in enumerate(present) if h.generation), None)
    if first_generation:  # the generation panels have their own reference (real held-out images)
        axes.flat[first_generation].legend(fontsize=6, loc="best")
    fig.suptitle(f"each metric against {parameter}", fontsize=10)
    fig.tight_layout()
    return png(fig)


def _pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points not dominated when lower x and higher y are better, sorted by x."""
    front, best_y = [], -np.inf
    for x, y, label in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best_y:
            front.append((x, y, label))
            best_y = y
    return front


def tradeoff_figure(results: pd.DataFrame, points: list[str]) -> Figure | None:
    """Generation (FD/FID, lower better) against representation (linear top-1), Pareto front marked;
    every point labelled without overlaps (see _label_points). None without both metrics."""
    plt = pyplot()
    # FD/FID of one profile only (the first present: records of no profile come first)
    fid = next((h for h in headlines(results) if h.metric == "fid" and h.generation and not select(results, h).empty),
               None)  # no fallback to unfiltered records: they could mix profiles and decoding settings
    if fid is None:
        return None
    gen, rep = select(results, fid), select(results, HEADLINES[0])
    if gen.empty or rep.empty:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=DPI)
    coords = []
    for p in points:
        g, r = gen[(gen["point"] == p) & (gen["role"] == "run")]["value"], rep[(rep["point"] == p) & (rep["role"] == "run")]["value"]
        if g.empty or r.empty or not np.isfinite([g.mean(), r.mean()]).all():
            continue
        coords.append((g.mean(), r.mean(), p))
        ax.errorbar(g.mean(), r.mean(), xerr=np.nan_to_num(g.std(ddof=1)), yerr=np.nan_to_num(r.std(ddof=1)),
                    fmt="o", capsize=3, color="tab:blue")
    front = _pareto(coords)
    if len(front) > 1:
        ax.plot([f[0] for f in front], [f[1] for f in front], color="tab:red", linewidth=1.2, label="Pareto front")
    ax.scatter([f[0] for f in front], [f[1] for f in front], s=90, facecolors="none", edgecolors="tab:red")
    avoid = []
    name = "reference: untrained model"
    g, r = gen[gen["point"] == name]["value"], rep[rep["point"] == name]["value"]
    if not g.empty and not r.empty and coords:
        xs, ys = [c[0] for c in coords], [c[1] for c in coords]
        span_x, span_y = max(max(xs) - min(xs), 1e-9), max(max(ys) - min(ys), 1e-9)
        # Far off, the reference would squeeze the sweep points into a corner: name it instead.
        if g.mean() > max(xs) + 3 * span_x or r.mean() < min(ys) - 3 * span_y:
            ax.scatter([], [], marker="x", color="0.4",
                       label=f"untrained model (off the axes): {g.mean():.3g}, {r.mean():.3f}")
        else:
            ax.scatter(g.mean(), r.mean(), marker="x", color="0.4", label=name)
            avoid.append((g.mean(), r.mean()))
    label = headline_label(fid, set(gen["feature_extractor"]))
    ax.set_xlabel(f"{label} (lower is better) →")
    ax.set_ylabel("linear probe top-1 (higher is better) →")
    ax.set_title("generation vs representation (mean ± std over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    # Outside the axes, the legend can never cover a point or its label.
    legend = (ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
              if ax.get_legend_handles_labels()[1] else None)
    _label_points(ax, coords, avoid, legend)
    return fig


def _label_points(ax: Axes, coords: list[tuple[float, float, str]], avoid: list[tuple[float, float]],
                  legend: Legend | None) -> None:
    """Each point's name right beside it when the names are distinct and fit there without
    overlapping; otherwise numbers on the plot (led to their points where crowded) and a key beside
    it. Should even numbers not fit (hundreds of points), the key gives each point's coordinates."""
    anchors = [(x, y) for x, y, _ in coords]
    names = [short(p, 24) for _, _, p in coords]
    distinct = len(set(names)) == len(names)
    if distinct and place_labels(ax, anchors, names, avoid=avoid, reach=NAME_REACH_PX) is not None:
        return
    numbered = place_labels(ax, anchors, [str(i) for i in range(1, len(coords) + 1)], avoid=avoid) is not None
    if numbered:
        lines = ["key"] + [f"{i}  {short(p, 60)}" for i, (_, _, p) in enumerate(coords, 1)]
    else:
        lines = ["too crowded to mark (FD, top-1)"]
        lines += [f"{short(p, 60)}: {x:.3g}, {y:.3f}" for x, y, p in coords]
    # Anchored below the legend (or where it would be), so the two blocks never overlap either.
    where = {"xy": (0, 0), "xycoords": legend, "xytext": (0, -8)} if legend else \
        {"xy": (1.02, 1.0), "xycoords": "axes fraction", "xytext": (0, 0)}
    ax.annotate("\n".join(lines), textcoords="offset points", va="top", ha="left", fontsize=7, **where)


def tradeoff(results: pd.DataFrame, points: list[str]) -> str | None:
    """The trade-off figure as a base64 PNG (None without generation and probe metrics)."""
    fig = tradeoff_figure(results, points)
    return png(fig) if fig is not None else None


def densities(sweep: dict[str, Any]) -> str | None:
    plt = pyplot()
    dens = sweep.get("densities") or {}
    if not dens:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, (label, d) in enumerate(dens.items()):
        color = f"C{i % 10}"
        if d.get("point_mass") is not None:
            ax.axvline(d["point_mass"], color=color, linewidth=2, label=f"{short(label)} (point mass)")
        else:
            y = np.array([np.nan if v is None else v for v in d["pdf"]], dtype=float)
            ax.plot(d["x"], y, color=color, label=short(label))
    return _finish(fig, ax, "masking ratio", "density", "masking-ratio distributions swept")


def loss_curves(runs: list[dict[str, Any]], folders: dict[str, Path]) -> str | None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    colors: dict[str, str] = {}
    labelled: set[str] = set()
    drawn = False
    for run in runs:
        lines = read_jsonl(folders.get(run["run"], Path()) / METRICS_FILE)
        if not lines:
            continue
        color = colors.setdefault(run["point"], f"C{len(colors) % 10}")
        ax.plot([r["step"] for r in lines], [r["loss"] for r in lines], color=color, linewidth=0.9, alpha=0.8,
                label=None if run["point"] in labelled else short(run["point"]))
        labelled.add(run["point"])
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    return _finish(fig, ax, "step", "training loss (one line per seed)", "training loss")


def grid_image(folder: Path) -> str | None:
    path = folder / "samples" / "grid.png"
    return base64.b64encode(path.read_bytes()).decode("ascii") if path.is_file() else None


__all__ = ["DPI", "Headline", "densities", "grid_image", "loss_curves", "metrics_vs_parameter", "png", "pyplot",
           "short", "tradeoff", "tradeoff_figure"]
