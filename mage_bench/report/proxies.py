"""The report's training-time proxies: their curves per run, and from which step they rank a sweep's points as
the final metrics do.

The proxies are the `proxy_*` keys that training adds to some metrics.jsonl lines (`mage_bench.proxies`):
a kNN top-1 on a fixed held-out subset and a small-sample FD. For a sweep of at least MIN_POINTS points,
each proxy's point means over seeds at step s are rank-correlated (Kendall's tau-b) with the point means of
the final metric it stands in for (the `knn` records at k=20; the `fid` records' value). The ranking is
"settled" from the first proxy step s from which tau stays >= SETTLED_TAU at every later proxy step.

Never imports torch: it reads run folders and the results table only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from mage_bench.io import read_jsonl
from mage_bench.proxies import (
    FD_EXTRACTOR_KEY,
    FD_SAMPLES_KEY,
    KNN_KEY,
    KNN_TEST_KEY,
    KNN_TRAIN_KEY,
    PROXIES,
    Proxy,
)
from mage_bench.report.collate import HEADLINES, headline_label, headlines, select
from mage_bench.report.figures import png, pyplot, short
from mage_bench.runs import METRICS_FILE

SETTLED_TAU = 0.8  # the ranking counts as settled while tau stays at or above this
MIN_POINTS = 3  # fewer points have no ranking worth correlating (2 points: tau is +-1)


def proxy_rows(runs: list[dict[str, Any]], folders: dict[str, Path]) -> pd.DataFrame:
    """One row per metrics.jsonl line holding a proxy: run, point, seed, step and the proxy keys."""
    keys = {p.key for p in PROXIES}
    rows = []
    for run in runs:
        for record in read_jsonl(folders.get(run["run"], Path()) / METRICS_FILE):
            if keys & set(record):
                rows.append({"run": run["run"], "point": run["point"], "seed": run.get("seed"), **record})
    return pd.DataFrame(rows)


def _label(proxy: Proxy, rows: pd.DataFrame) -> str:
    """The proxy's name with what it was computed on (the sample sizes and the FD's extractor)."""
    def one(column: str) -> str:
        values = sorted({str(v) for v in rows.get(column, pd.Series(dtype=object)).dropna()})
        return "/".join(values) or "?"

    if proxy.key == KNN_KEY:
        return f"proxy {proxy.label}: {one(KNN_TRAIN_KEY)} train / {one(KNN_TEST_KEY)} test images"
    return f"proxy {proxy.label} ({one(FD_EXTRACTOR_KEY)}, {one(FD_SAMPLES_KEY)} samples)"


def curves(rows: pd.DataFrame, points: list[str]) -> str | None:
    """One panel per proxy present: value against step, one colour per point, one line per run (seed)."""
    present = [p for p in PROXIES if p.key in rows and rows[p.key].notna().any()]
    if not present:  # every proxy value null (diverged runs)
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(present), figsize=(5.6 * len(present), 3.8), squeeze=False)
    order = points + sorted(set(rows["point"]) - set(points))
    colours = {point: f"C{i % 10}" for i, point in enumerate(order)}
    for ax, proxy in zip(axes.flat, present, strict=True):
        labelled = set()
        for _, data in rows[rows[proxy.key].notna()].groupby("run", sort=False):
            point = data["point"].iloc[0]
            ax.plot(data["step"], data[proxy.key], marker="o", markersize=3, linewidth=0.9, alpha=0.85,
                    color=colours[point], label=None if point in labelled else short(point))
            labelled.add(point)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{proxy.label} ({'higher' if proxy.higher_is_better else 'lower'} is better)")
        ax.set_title(_label(proxy, rows), fontsize=9)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return png(fig)


def settled_step(steps: list[int], taus: list[float], threshold: float = SETTLED_TAU) -> int | None:
    """The first step from which every tau (that step's and all later ones) is >= threshold; None if the
    last one is not (NaN counts as below)."""
    settled = None
    for step, tau in zip(steps, taus, strict=True):
        if not (tau >= threshold):  # NaN included
            settled = None
        elif settled is None:
            settled = step
    return settled


def _final_means(results: pd.DataFrame, proxy: Proxy, extractors: set[str]) -> tuple[pd.Series, str, str | None]:
    """(the final metric's mean over seeds per point, its label, a note when the records had to be narrowed
    or are missing). FD records of several extractors are narrowed to the proxy's one, when there."""
    base = next(h for h in HEADLINES if h.key == proxy.final)
    # One profile's records only (records of no profile first): numbers of two profiles never share an axis
    headline = next((h for h in headlines(results) if (h.evaluator, h.metric) == (base.evaluator, base.metric)
                     and not select(results, h).empty), None)  # no fallback: unfiltered records could mix protocols
    if headline is None:
        return pd.Series(dtype=float), base.key, f"no final {base.key} records to compare with"
    records = select(results, headline)
    if records.empty:
        return pd.Series(dtype=float), headline.key, f"no final {headline.key} records to compare with"
    records = records[records["role"] == "run"]
    note = None
    if headline.generation and records["feature_extractor"].nunique() > 1:
        same = records[records["feature_extractor"].isin(extractors)]
        if same.empty:
            return (pd.Series(dtype=float), headline.key,
                    "the final FD records use several extractors, none the proxy's")
        records, note = same, f"final FD records of the proxy's extractor ({', '.join(sorted(extractors))}) only"
    label = headline_label(headline, set(records["feature_extractor"]))
    return records.groupby("point")["value"].mean(), label, note


def ranking(rows: pd.DataFrame, results: pd.DataFrame, points: list[str], threshold: float = SETTLED_TAU
            ) -> list[dict[str, Any]]:
    """Per proxy present: Kendall's tau between the point means of the proxy at each step and of the final
    metric, the settled step, the final step's tau and p-value, and the number of points."""
    from scipy.stats import kendalltau

    out = []
    for proxy in PROXIES:
        if proxy.key not in rows or not rows[proxy.key].notna().any():
            continue
        extractors = set(rows.get(FD_EXTRACTOR_KEY, pd.Series(dtype=object)).dropna())
        final, final_label, note = _final_means(results, proxy, extractors)
        entry: dict[str, Any] = {"label": _label(proxy, rows), "proxy": proxy.label, "final": final_label,
                                 "note": note, "points": 0, "steps": [], "taus": [], "p_values": []}
        out.append(entry)
        usable = [p for p in points if p in final.index and math.isfinite(final[p])]
        means = rows[rows["point"].isin(usable)].groupby(["step", "point"])[proxy.key].mean().unstack("point")
        entry["points"] = len(usable)
        if len(usable) < MIN_POINTS:
            continue
        skipped = 0
        for step, row in means.iterrows():
            have = [p for p in usable if p in row.index and math.isfinite(row[p])]
            if len(have) < len(usable):  # its tau would rank other points than the rest: left out, and said
                skipped += 1
                continue
            tau, p_value = kendalltau([row[p] for p in have], [final[p] for p in have])
            entry["steps"].append(int(step))
            entry["taus"].append(float(tau))
            entry["p_values"].append(float(p_value))
        last = (entry["steps"][-1], entry["taus"][-1], entry["p_values"][-1]) if entry["steps"] else (None, math.nan,
                                                                                                    math.nan)
        entry["final_step"], entry["final_tau"], entry["p_value"] = last
        entry["settled_step"] = settled_step(entry["steps"], entry["taus"], threshold)
        if skipped:
            entry["note"] = "; ".join(filter(None, [note, f"{skipped} proxy step(s) that some point lacks (its runs "
                                                          "stop earlier, diverged, or log proxies at other steps) are "
                                                          "left out"]))
    return out


def tau_figure(entries: list[dict[str, Any]], threshold: float = SETTLED_TAU) -> str | None:
    plt = pyplot()
    drawn = [e for e in entries if e["steps"]]
    if not drawn:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, entry in enumerate(drawn):
        ax.plot(entry["steps"], entry["taus"], marker="o", markersize=3, color=f"C{i}",
                label=f"proxy {entry['proxy']} vs final {entry['final']}")
    ax.axhline(threshold, color="0.4", linestyle="--", linewidth=1, label=f"settled: tau ≥ {threshold}")
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("step")
    ax.set_ylabel("Kendall tau over the sweep's points")
    ax.set_title(f"rank agreement with the final metrics ({drawn[0]['points']} points)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return png(fig)


def _sentence(entry: dict[str, Any], threshold: float) -> str:
    what = f"Proxy {entry['proxy']} against the final {entry['final']}"
    if entry["points"] < MIN_POINTS:
        why = entry["note"] or f"{entry['points']} point(s) have both"
        return f"{what}: no rank correlation ({why}; it needs at least {MIN_POINTS} points)."
    if entry["settled_step"] is None:
        verdict = f"the ranking is not settled (tau is below {threshold} at the final step)"
    else:
        verdict = (f"the step from which the ranking is settled is {entry['settled_step']} (tau ≥ {threshold} there "
                   "and at every later proxy step)")
    final = (f"at the final step ({entry['final_step']}) tau = {entry['final_tau']:.2f}, p = {entry['p_value']:.3g}"
             if math.isfinite(entry["final_tau"]) else f"at the final step ({entry['final_step']}) tau is undefined")
    note = f" ({entry['note']})" if entry["note"] else ""
    return f"{what}{note}, over {entry['points']} points: {verdict}; {final}."


def section(runs: list[dict[str, Any]], folders: dict[str, Path], results: pd.DataFrame,
            points: list[str], threshold: float = SETTLED_TAU) -> dict[str, Any] | None:
    """The report's "Training-time proxies" section; None when no metrics.jsonl holds a proxy line."""
    rows = proxy_rows(runs, folders)
    if rows.empty:
        return None
    points = points or sorted(set(rows["point"]))
    entries = ranking(rows, results, points, threshold)
    n = max((e["points"] for e in entries), default=0)
    pairs = n * (n - 1) // 2
    return {
        "curves": curves(rows, points), "tau_figure": tau_figure(entries, threshold),
        "sentences": [_sentence(e, threshold) for e in entries], "threshold": threshold,
        "points": n, "pairs": pairs, "tau_step": 2 / pairs if pairs else None,
        "runs": int(rows["run"].nunique()), "steps": sorted(int(s) for s in rows["step"].unique()),
        "ranked": any(e["steps"] for e in entries), "min_points": MIN_POINTS,
    }
