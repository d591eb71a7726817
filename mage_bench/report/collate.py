"""Collect result records from run folders into pandas tables (never imports torch).

A sweep folder (with sweep.json) contributes its runs and its reference rows; any other folder is
read as one run folder, or as a folder of run folders. Each record becomes one row of results.csv,
with the run's sweep point (`point`), swept value (`swept_value`) and `role` (run | reference); a
run of a grid sweep also gets one `axis:<parameter>` column per swept parameter, holding its label
on that axis (so the CSV pivots by axis without parsing the combined point label).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mage_bench.errors import UserError
from mage_bench.results import read_records

SWEEP_FILE, RUN_META, FAILED_FILE, EVAL_DIR = "sweep.json", "sweep-run.json", "FAILED", "eval"
REFERENCE_LABELS = {"reference-raw-pixels": "reference: raw pixels", "untrained": "reference: untrained model",
                    "reference-real-test": "reference: real held-out images",
                    "reference-real-train": "reference: real held-out images"}
TIMING_COLUMNS = ("created_at",)  # differ between otherwise identical reruns
AXIS_PREFIX = "axis:"


def axis_column(parameter: str) -> str:
    """results.csv's column holding a run's label on the axis of this swept parameter."""
    return AXIS_PREFIX + parameter


@dataclass(frozen=True)
class Headline:
    """A metric the summary table and figures show."""

    key: str
    evaluator: str
    metric: str
    label: str
    where: dict[str, Any] = field(default_factory=dict)  # extra column filters, e.g. {"k": 20}
    generation: bool = False


HEADLINES = (
    Headline("linear", "linear", "top1", "linear probe top-1"),
    Headline("knn", "knn", "top1", "kNN top-1 (k=20)", {"k": 20}),
    Headline("fewshot", "fewshot", "top1", "10-shot top-1", {"shots": 10}),
    Headline("map", "knn", "map_at_r", "retrieval mAP@R"),
    Headline("fid", "fid", "fid", "FID", generation=True),
    Headline("is", "fid", "is", "IS", generation=True),
    Headline("kid", "fid", "kid", "KID", generation=True),
)


def headline_label(headline: Headline, extractors: set[str]) -> str:
    """FID/IS/KID only with the standard Inception weights; otherwise say which extractor."""
    if not headline.generation or extractors <= {"inception-v3"}:
        return headline.label
    name = {"fid": "FD", "is": "IS", "kid": "KD"}[headline.key]
    return f"{name} ({', '.join(sorted(extractors))}; not Inception)"


@dataclass
class Collected:
    results: pd.DataFrame
    sweeps: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    folders: dict[str, Path]  # run name -> folder (for grids and loss curves)


def _records_of(folder: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted((folder / EVAL_DIR).glob("*.json")):
        out.extend(read_records(path))
    return out


def _looks_like_run(folder: Path) -> bool:
    return (folder / EVAL_DIR).is_dir() or (folder / FAILED_FILE).is_file() or (folder / RUN_META).is_file()


def collect(paths: list[str | Path]) -> Collected:
    rows: list[dict[str, Any]] = []
    sweeps, failed, folders = [], [], {}

    def add_run(folder: Path, meta: dict[str, Any] | None, role: str = "run", label: str | None = None) -> None:
        meta = meta or (json.loads((folder / RUN_META).read_text()) if (folder / RUN_META).is_file() else {})
        point = label or meta.get("point") or folder.name
        if (folder / FAILED_FILE).is_file():
            failed.append({"run": folder.name, "point": point, **json.loads((folder / FAILED_FILE).read_text())})
        folders[folder.name] = folder
        axes = {axis_column(parameter): label for parameter, label in (meta.get("axes") or {}).items()}
        for record in _records_of(folder):
            rows.append({**record, "point": point, "swept_value": json.dumps(meta.get("value")),
                         "role": role, **axes})

    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise UserError(f"{path} is not a folder of runs; give a sweep's runs folder (e.g. runs/masking)")
        if (path / SWEEP_FILE).is_file():
            sweep = json.loads((path / SWEEP_FILE).read_text())
            sweeps.append({**sweep, "folder": str(path)})
            for run in sweep["runs"]:
                add_run(path / run["run"], run)
            reference = path / "_reference"
            for file in sorted(reference.glob("*.json")):
                for record in read_records(file):
                    rows.append({**record, "point": REFERENCE_LABELS.get(record["run"], record["run"]),
                                 "swept_value": "null", "role": "reference"})
            if (reference / "untrained").is_dir():
                add_run(reference / "untrained", {}, role="reference", label=REFERENCE_LABELS["untrained"])
        elif _looks_like_run(path):
            add_run(path, None)
        else:
            runs = [p for p in sorted(path.iterdir()) if p.is_dir() and _looks_like_run(p)]
            if not runs:
                raise UserError(f"{path} holds no run folders (no eval/ records); evaluate runs with "
                                "mage-bench eval all first")
            for run in runs:
                add_run(run, None)
    if not rows and not failed:
        raise UserError("no result records found in " + ", ".join(str(p) for p in paths))
    results = pd.DataFrame(rows)
    if "versions" in results:
        results["versions"] = results["versions"].map(lambda v: json.dumps(v, sort_keys=True) if isinstance(v, dict)
                                                      else v)
    return Collected(results, sweeps, failed, folders)


def select(results: pd.DataFrame, headline: Headline) -> pd.DataFrame:
    if results.empty:
        return results
    mask = (results["evaluator"] == headline.evaluator) & (results["metric"] == headline.metric)
    for column, value in headline.where.items():
        mask &= results.get(column, pd.Series(np.nan, index=results.index)) == value
    return results[mask]


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Mean, std (ddof 1) and count over seeds per (point, evaluator, metric, k, shots)."""
    keys = [c for c in ("role", "point", "evaluator", "metric", "feature_extractor", "k", "shots") if c in results]
    frame = results.copy()
    for column in ("k", "shots"):
        if column in frame:
            frame[column] = frame[column].fillna(-1)
    summary = (frame.groupby(keys, sort=False)["value"].agg(["mean", "std", "count"]).reset_index())
    for column in ("k", "shots"):
        if column in summary:
            summary[column] = summary[column].replace(-1, np.nan)
    higher = frame.groupby(keys, sort=False)["higher_is_better"].first().reset_index(drop=True)
    summary["higher_is_better"] = higher.values
    return summary


def seed_spread(groups: list[pd.Series]) -> tuple[float, int]:
    """The seed-to-seed standard deviation pooled over all sweep points, and its degrees of freedom.

    Pooling assumes the seed noise is alike across points (one training recipe); it keeps a point
    whose two seeds happen to agree from looking noise-free. df = sum(n_i - 1); 0 when unknown.
    """
    df = sum(max(len(g) - 1, 0) for g in groups)
    if df == 0:
        return float("nan"), 0
    squares = sum(float(((g - g.mean()) ** 2).sum()) for g in groups if len(g) > 1)
    return float(np.sqrt(squares / df)), df


def beyond_noise(a: pd.Series, b: pd.Series, spread: float, df: int, alpha: float = 0.05) -> bool | None:
    """Does the difference of two points' means exceed the seed spread? A two-sided t-test with the
    pooled spread (p < alpha). None: the spread is unknown (no point has 2 seeds) or a side is empty."""
    from scipy import stats

    if df == 0 or len(a) == 0 or len(b) == 0:
        return None
    diff = abs(a.mean() - b.mean())
    if spread == 0:
        return bool(diff > 0)
    t = diff / (spread * np.sqrt(1 / len(a) + 1 / len(b)))
    return bool(2 * stats.t.sf(t, df) < alpha)
