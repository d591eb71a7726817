"""`mage-bench report`: results.csv, summary.csv and a self-contained index.html from result records.

Never imports torch: it reads run folders (records, sweep.json, metrics.jsonl, sample grids) only.
The HTML is rendered by Jinja2 with autoescape on, so run names, labels and config values from users
appear as text; figures are PNGs embedded as data URIs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from mage_bench.report.collate import TIMING_COLUMNS, collect, summarise

RESULTS_CSV, SUMMARY_CSV, INDEX_HTML = "results.csv", "summary.csv", "index.html"


def build_report(paths: list[str | Path], out_dir: str | Path) -> Path:
    """Write results.csv, summary.csv and index.html into out_dir; returns the index path."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    from mage_bench.io import atomic_write_text, utc_now
    from mage_bench.report import decoding, depth, figures, grid, inpaint, proxies, tables

    collected = collect(paths)
    results = collected.results
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sort_keys = [c for c in ("role", "point", "run", "evaluator", "metric", "k", "shots") if c in results]
    results = results.sort_values(sort_keys, kind="stable").reset_index(drop=True)
    atomic_write_text(out / RESULTS_CSV, results.to_csv(index=False))
    summary = summarise(results) if not results.empty else pd.DataFrame()
    atomic_write_text(out / SUMMARY_CSV, summary.to_csv(index=False))

    sweep = collected.sweeps[0] if collected.sweeps else {}
    references = sorted(set(results[results["role"] == "reference"]["point"])) if not results.empty else []
    points = [p["label"] for p in sweep.get("points", [])]  # the spec's order
    if not points and not results.empty:  # plain run folders: one point per run
        points = sorted(set(results["point"]) - set(references))
    runs = sweep.get("runs") or [{"run": name, "point": name} for name in collected.folders]
    noise = tables.noise(results, points) if not results.empty else []
    axes = grid.axes_of(sweep)
    seeds = sweep.get("seeds", [])
    # "none" marks records computed on no feature network (inpainting's token accuracy and PSNR).
    extractors = sorted(set(results["feature_extractor"]) - {"none"}) if not results.empty else []
    gen = results[results["evaluator"] == "fid"] if not results.empty else results
    page = {
        "title": f"mage-bench report: {sweep.get('sweep', ', '.join(str(p) for p in paths))}",
        "sweep": sweep, "parameter": sweep.get("parameter", "run"), "seeds": seeds,
        "table": tables.summary_table(results, points, references) if not results.empty else None,
        "differs": tables.differs_table(sweep),
        "axes": [{"parameter": a.parameter, "count": len(a.labels)} for a in axes],
        "noise": noise, "all_within_noise": bool(noise) and all(n["within_noise"] for n in noise),
        "any_unknown": any(n["unknown"] for n in noise),
        "figures": {"metrics": figures.metrics_vs_parameter(results, points, sweep.get("parameter", "run"))
                    if not results.empty else None,
                    "tradeoff": figures.tradeoff(results, points) if not results.empty else None,
                    "densities": figures.densities(sweep), "loss": figures.loss_curves(runs, collected.folders),
                    "heat_maps": grid.heat_maps(results, axes), "main_effects": grid.main_effects(results, axes)},
        "grids": [g for g in ({"run": r["run"], "point": r["point"], "seed": r.get("seed"),
                               "png": figures.grid_image(collected.folders[r["run"]])}
                              for r in runs if r["run"] in collected.folders) if g["png"]],  # each PNG read once
        "inpaint": inpaint.section(results, points, collected.folders) if not results.empty else None,
        "depth": depth.section(results, points) if not results.empty else None,
        "decoding": decoding.section(results, points) if not results.empty else None,
        "proxies": proxies.section(runs, collected.folders, results, points),
        "failed": collected.failed,
        "nonstandard": sorted(set(gen["feature_extractor"]) - {"inception-v3"}) if len(gen) else [],
        "extractors": extractors,
        "samples": {"generated": int(gen["n_samples"].max()) if len(gen) else None,
                    # a statistics reference without reference samples has no real count
                    "real": int(gen["n_real"].dropna().max()) if len(gen) and "n_real" in gen
                    and gen["n_real"].notna().any() else None,
                    "test": int(results[results["evaluator"] == "linear"]["n_samples"].max())
                    if not results.empty and (results["evaluator"] == "linear").any() else None},
        "provenance": sweep.get("provenance") or _provenance_from(results),
        "timings": sweep.get("timings", {}), "run_timings": [r for r in runs if r.get("timing")],
        "generated_at": utc_now(), "timing_columns": ", ".join(TIMING_COLUMNS),
    }
    env = Environment(loader=PackageLoader("mage_bench.report", "templates"),
                      autoescape=select_autoescape(["html", "j2"], default=True))
    html = env.get_template("index.html.j2").render(**page, json=json)
    atomic_write_text(out / INDEX_HTML, html)
    return out / INDEX_HTML


def _provenance_from(results: pd.DataFrame) -> dict[str, Any]:
    if results.empty:
        return {}
    first = results.iloc[0]
    versions = first.get("versions")
    return {"git_commit": first.get("git_commit"), "versions": json.loads(versions) if isinstance(versions, str)
            else versions, "date": first.get("created_at")}
