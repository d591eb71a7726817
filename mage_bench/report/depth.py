"""The report's depth profile: probe accuracy against the encoder block, per sweep point (never imports torch).

Records of the evaluators on cached features carry `layer` (0-based block; the last is `depth` - 1) and
`pooling` (`eval.layers` / `--layers`, `eval.pooling` / `--pooling`). When a sweep probed more than one block,
this section draws each headline probe metric against the block, one line per point (mean and seed spread),
marks each point's best block, and says whether the points' ranking depends on the block probed: a
masking-ratio verdict that flips with the layer is not a verdict.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from mage_bench.report.collate import HEADLINES, Headline, headline_label, headline_rows
from mage_bench.report.figures import png, pyplot, short

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PROBES = tuple(h for h in HEADLINES if not h.generation)  # linear, kNN, few-shot, retrieval


def _rows(results: pd.DataFrame, headline: Headline) -> pd.DataFrame:
    """Every block and pooling of one headline metric, sweep runs only."""
    if results.empty or "layer" not in results or "pooling" not in results:
        return results.iloc[0:0]
    rows = headline_rows(results, headline)
    return rows[(rows["role"] == "run") & rows["layer"].notna()]


def profiles(results: pd.DataFrame, points: list[str]) -> list[tuple[Headline, str, pd.DataFrame]]:
    """(headline, pooling, per point x block mean/std/count) for every metric probed at two or more blocks."""
    out = []
    for headline in PROBES:
        rows = _rows(results, headline)
        rows = rows[rows["point"].isin(points)]
        if rows.empty:  # (an empty frame may lack the view columns altogether)
            continue
        for pooling, data in rows.groupby("pooling", sort=True):
            if data["layer"].nunique() < 2:
                continue
            stats = data.groupby(["point", "layer"])["value"].agg(["mean", "std", "count"]).reset_index()
            out.append((headline, str(pooling), stats))
    return out


def best_blocks(stats: pd.DataFrame, higher: bool) -> dict[str, tuple[int, float]]:
    """{point: (its best block, that block's mean)}; ties go to the shallower block."""
    out = {}
    for point, data in stats.groupby("point", sort=False):
        data = data.dropna(subset=["mean"]).sort_values("layer")  # a diverged run's NaN block is no best
        if data.empty:
            continue
        index = data["mean"].idxmax() if higher else data["mean"].idxmin()
        out[point] = (int(data.loc[index, "layer"]), float(data.loc[index, "mean"]))
    return out


def ranking_by_block(stats: pd.DataFrame, points: list[str], higher: bool) -> dict[int, tuple[str, ...]]:
    """{block: the points ordered best first by their mean there} (blocks every point was probed at)."""
    out = {}
    for layer, data in stats.groupby("layer", sort=True):
        if set(data["point"]) >= set(points):
            ordered = data.sort_values("mean", ascending=not higher, kind="stable")
            out[int(layer)] = tuple(ordered["point"])
    return out


def depth_figure(results: pd.DataFrame, points: list[str]) -> Figure | None:
    """One panel per (probe metric, pooling) probed at several blocks: mean +- std over seeds against the
    block, one line per point, each point's best block starred. None when nothing was probed at two blocks."""
    present = profiles(results, points)
    if not present:
        return None
    plt = pyplot()
    cols = min(3, len(present))
    nrows = int(np.ceil(len(present) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.5 * nrows), squeeze=False)
    colors = {p: f"C{i % 10}" for i, p in enumerate(points)}
    for ax, (headline, pooling, stats) in zip(axes.flat, present, strict=False):
        higher = bool(_rows(results, headline)["higher_is_better"].iloc[0])
        best = best_blocks(stats, higher)
        for point in points:
            data = stats[stats["point"] == point].sort_values("layer")
            if data.empty:
                continue
            ax.errorbar(data["layer"], data["mean"], yerr=np.nan_to_num(data["std"]), fmt="-o", markersize=3,
                        capsize=2, linewidth=1.1, color=colors[point], label=short(point))
            layer, value = best[point]
            ax.plot([layer], [value], marker="*", markersize=11, color=colors[point], linestyle="none")
        extractors = set(_rows(results, headline)["feature_extractor"])
        ax.set_title(f"{headline_label(headline, extractors)} ({pooling}) {'↑' if higher else '↓'}", fontsize=9)
        ax.set_xlabel("encoder block (0-based; last = depth - 1)", fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6, loc="best")
    fig.suptitle("probe accuracy against depth (mean ± std over seeds; ★ each point's best block)", fontsize=10)
    fig.tight_layout()
    return fig


def section(results: pd.DataFrame, points: list[str]) -> dict[str, Any] | None:
    """The figure and, per profile, each point's best block and whether the ranking of the points changes
    with the block probed; None when no metric was probed at two or more blocks."""
    present = profiles(results, points)
    if not present:
        return None
    tables = []
    for headline, pooling, stats in present:
        higher = bool(_rows(results, headline)["higher_is_better"].iloc[0])
        rankings = ranking_by_block(stats, points, higher)
        orders = set(rankings.values())
        extractors = set(_rows(results, headline)["feature_extractor"])
        tables.append({
            "metric": f"{headline_label(headline, extractors)} ({pooling})",
            "best": [{"point": p, "layer": layer, "value": value}
                     for p, (layer, value) in best_blocks(stats, higher).items()],
            "stable": len(orders) <= 1,
            "orders": [{"layer": layer, "order": " > ".join(order)} for layer, order in rankings.items()]
            if len(orders) > 1 else [],
        })
    fig = depth_figure(results, points)
    return {"figure": png(fig) if fig is not None else None, "tables": tables}


__all__ = ["best_blocks", "depth_figure", "profiles", "ranking_by_block", "section"]
