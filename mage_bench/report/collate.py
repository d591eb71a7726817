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
from mage_bench.eval.extractors import standard_extractors
from mage_bench.eval.generation import EVALUATOR as GENERATION_EVALUATOR
from mage_bench.eval.runner import metric_of
from mage_bench.metrics import Metric
from mage_bench.results import read_records
from mage_bench.runs import (
    EVAL_DIR,
    FAILED_FILE,
    REFERENCE_DIR,
    REFERENCE_LABELS,
    RUN_META,
    SWEEP_FILE,
    UNTRAINED_RUN,
)

TIMING_COLUMNS = ("created_at",)  # differ between otherwise identical reruns
AXIS_PREFIX = "axis:"


def axis_column(parameter: str) -> str:
    """results.csv's column holding a run's label on the axis of this swept parameter."""
    return AXIS_PREFIX + parameter


@dataclass(frozen=True)
class Headline:
    """A metric the summary table and figures show: one declared metric of one evaluator, narrowed by
    `where` (extra column filters, e.g. {"k": 20})."""

    key: str
    evaluator: str
    metric: str
    where: dict[str, Any] = field(default_factory=dict)

    @property
    def declaration(self) -> Metric:
        return metric_of(self.evaluator, self.metric)

    @property
    def generation(self) -> bool:
        return self.evaluator == GENERATION_EVALUATOR


HEADLINES = (
    Headline("linear", "linear", "top1"),
    Headline("knn", "knn", "top1", {"k": 20}),
    Headline("fewshot", "fewshot", "top1", {"shots": 10}),
    Headline("map", "knn", "map_at_r"),
    Headline("fid", "fid", "fid"),
    Headline("is", "fid", "is"),
    Headline("kid", "fid", "kid"),
    Headline("finetune", "finetune", "top1"),  # `eval finetune` / eval.finetune: present only when run
    Headline("cmmd", "fid", "cmmd"),  # evaluation profiles that compute it (`cmmd`): present only then
)


def profiles_of(results: pd.DataFrame, headline: Headline) -> list[tuple[str | None, str | None]]:
    """The evaluation profiles, as (name, profile_hash), a generation headline's records were computed under
    ((None, None): no profile), in first-seen order. A name seen with two hashes (an edited user YAML, another
    version of a built-in) is two protocols."""
    rows = headline_rows(results, headline)
    if rows.empty:
        return []
    if "profile" not in rows:
        return [(None, None)]
    hashes = rows["profile_hash"] if "profile_hash" in rows else pd.Series(None, index=rows.index)
    return list(dict.fromkeys((None if pd.isna(p) else str(p), None if pd.isna(p) or pd.isna(h) else str(h))
                              for p, h in zip(rows["profile"], hashes, strict=True)))


def headlines(results: pd.DataFrame) -> list[Headline]:
    """HEADLINES, with every generation headline split by evaluation profile: numbers of two profiles (other
    extractor, reference, sample count, format) never share a column, a figure panel or an axis. A headline
    narrowed to a profile is keyed `<key>@<profile>` and labelled with it; records of no profile keep the key."""
    out = []
    for headline in HEADLINES:
        if not headline.generation or results.empty:
            out.append(headline)
            continue
        # Never a decoding sweep's records (`eval.decode_grid`): the report draws those apart (`report.decoding`)
        headline = Headline(headline.key, headline.evaluator, headline.metric, {**headline.where, "decode_grid": None})
        found = profiles_of(results, headline) or [(None, None)]
        for name, digest in found:
            several = sum(n == name for n, _ in found) > 1  # one name, two protocols: the hash tells them apart
            key = headline.key if name is None else f"{headline.key}@{name}" + (f"[{digest}]" if several else "")
            where = {**headline.where, "profile": name}
            if name is not None:
                where["profile_hash"] = digest
            out.append(Headline(key, headline.evaluator, headline.metric, where))
    return out


def headline_label(headline: Headline, extractors: set[str]) -> str:
    """The declared label; generation metrics name their extractor unless it is the standard one."""
    where = dict(headline.where)
    digest = where.pop("profile_hash", None)
    if where.get("profile") is not None and "[" in headline.key:  # a name seen with several hashes
        where["profile"] = f"{where['profile']} [{str(digest)[:8]}]"
    qualifier = ", ".join(f"{k}={v}" if k != "profile" else f"profile {v}" for k, v in where.items() if v is not None)
    return headline.declaration.display(extractors, standard=extractors <= standard_extractors(),
                                        qualifier=qualifier)


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
            reference = path / REFERENCE_DIR
            for file in sorted(reference.glob("*.json")):
                for record in read_records(file):
                    rows.append({**record, "point": REFERENCE_LABELS.get(record["run"], record["run"]),
                                 "swept_value": "null", "role": "reference"})
            if (reference / UNTRAINED_RUN).is_dir():
                add_run(reference / UNTRAINED_RUN, {}, role="reference", label=REFERENCE_LABELS[UNTRAINED_RUN])
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


def official_view(results: pd.DataFrame) -> pd.Series:
    """Rows of the official probe feature (the last block, mean-pooled), or of no probe feature at all:
    a headline never mixes the depth profile's other blocks and poolings into one number."""
    if not {"layer", "pooling", "depth"} <= set(results.columns):  # records of no probe view (or older ones)
        return pd.Series(True, index=results.index)
    no_view = results["layer"].isna()
    last_mean = (results["layer"] == results["depth"] - 1) & (results["pooling"] == "mean")
    return no_view | last_mean


def headline_rows(results: pd.DataFrame, headline: Headline) -> pd.DataFrame:
    """Every record of one headline metric, at every probed block and pooling (the depth profile's rows)."""
    if results.empty:
        return results
    mask = (results["evaluator"] == headline.evaluator) & (results["metric"] == headline.metric)
    for column, value in headline.where.items():
        values = results.get(column, pd.Series(np.nan, index=results.index))
        mask &= values.isna() if value is None else values == value  # None: records without the field
    return results[mask]


def select(results: pd.DataFrame, headline: Headline) -> pd.DataFrame:
    """The records of one headline metric that the summary and figures use: the official probe view only."""
    rows = headline_rows(results, headline)
    return rows[official_view(rows)]


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Mean, std (ddof 1) and count over seeds per (point, evaluator, metric, profile, decoding setting, k, shots,
    mask, layer, pooling).

    `mask` (inpaint records) keeps different masks of one metric apart; records without one (every other
    evaluator) group as before, their key columns held by a placeholder only while grouping."""
    keys = [c for c in ("role", "point", "evaluator", "metric", "feature_extractor", "profile", "profile_hash",
                        "decode_grid",
                        "decode_steps", "decode_temperature", "k", "shots", "mask", "layer", "pooling") if c in results]
    # groupby drops rows whose key is NaN: fill each optional key with a value it never takes, then undo.
    placeholders = {"profile": "", "profile_hash": "", "decode_grid": "", "decode_steps": -1, "decode_temperature": -1.0, "k": -1,
                    "shots": -1, "mask": "", "layer": -1, "pooling": ""}
    frame = results.copy()
    for column, placeholder in placeholders.items():
        if column in frame:
            frame[column] = frame[column].fillna(placeholder)
    summary = (frame.groupby(keys, sort=False)["value"].agg(["mean", "std", "count"]).reset_index())
    for column, placeholder in placeholders.items():
        if column in summary:
            summary[column] = summary[column].replace(placeholder, np.nan)
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
