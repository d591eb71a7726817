"""The result record (ARCHITECTURE.md): one per metric value, with provenance; read and written atomically.

Fields: sweep, run, evaluator, metric, value, higher_is_better, n_samples, dataset, split,
feature_extractor, seed, config_hash, git_commit, versions, created_at, plus evaluator-specific
fields (k, shots, std, ci_low, ci_high, ...). `RUN/eval/NAME.json` holds a JSON list of them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mage_bench.config import DataConfig, run_identity, to_dict
from mage_bench.errors import UserError
from mage_bench.io import atomic_write_json, git_commit, package_versions, utc_now
from mage_bench.metrics import Metric, declared

REQUIRED = ("sweep", "run", "evaluator", "metric", "value", "higher_is_better", "n_samples", "dataset", "split",
            "feature_extractor", "seed", "config_hash", "git_commit", "versions", "created_at")


def config_hash(config: Any) -> str:
    """sha256 of the resolved config as canonical JSON (what makes two runs the same run).

    The tokenizer is named by its content (the sha256 of its weights), not by where it lies, so the same
    sweep run in two folders gives its records the same hashes. Settings that change only what a run logs
    (`config.OBSERVATION_KEYS`) are left out, and so are keys added later at their old meaning
    (`config.LATER_KEYS`). `config` may be a data section alone (the raw-pixel reference rows)."""
    data = to_dict(config)
    data = run_identity({"data": data})["data"] if isinstance(config, DataConfig) else run_identity(data)
    return _hash(_with_tokenizer_identity(data))


def path_config_hash(config: Any) -> str:
    """The hash as written before the tokenizer was named by content (with its path): only to
    recognise run folders made then."""
    return _hash(run_identity(to_dict(config)))


def _with_tokenizer_identity(data: Any) -> Any:
    if isinstance(data, dict) and isinstance(data.get("tokenizer"), str):
        from mage_bench.tokenizer import tokenizer_identity

        return {**data, "tokenizer": tokenizer_identity(data["tokenizer"])}
    return data


def _hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ResultRecord:
    sweep: str | None
    run: str
    evaluator: str
    metric: str
    value: float
    higher_is_better: bool
    n_samples: int
    dataset: str
    split: str
    feature_extractor: str
    seed: int
    config_hash: str
    git_commit: str | None = field(default_factory=git_commit)
    versions: dict[str, str] = field(default_factory=package_versions)
    created_at: str = field(default_factory=utc_now)
    extra: dict[str, Any] = field(default_factory=dict)  # evaluator-specific fields, flattened on write

    def as_dict(self) -> dict[str, Any]:
        record = asdict(self)
        extra = record.pop("extra")
        clash = set(extra) & set(record)
        if clash:
            raise ValueError(f"evaluator fields {sorted(clash)} clash with the record's own fields")
        return {**record, **extra}


@dataclass(frozen=True)
class RecordContext:
    """The provenance every record of one evaluation shares (one evaluator on one run or folder)."""

    evaluator: str
    run: str
    dataset: str
    split: str
    feature_extractor: str
    n_samples: int
    seed: int
    config_hash: str | None
    sweep: str | None = None


Row = tuple[str, float, dict[str, Any]]  # (metric key, value, evaluator-specific fields)


def build_records(context: RecordContext, metrics: tuple[Metric, ...], rows: list[Row]) -> list[ResultRecord]:
    """The one way records are made: each row's direction comes from its metric's declaration."""
    return [ResultRecord(sweep=context.sweep, run=context.run, evaluator=context.evaluator, metric=key,
                         value=float(value),
                         higher_is_better=declared(metrics, key, context.evaluator).higher_is_better,
                         n_samples=int(context.n_samples), dataset=context.dataset, split=context.split,
                         feature_extractor=context.feature_extractor, seed=context.seed,
                         config_hash=context.config_hash, extra=extra)
            for key, value, extra in rows]


def write_records(path: str | Path, records: list[ResultRecord]) -> None:
    """Write a records file atomically. Its inputs file (`runs.records_inputs_file`), if any, is removed
    first: whoever writes records (a sweep, `eval fid`, `bench eval`), an old inputs file must never
    vouch for new records; `eval.runner` writes the new one after the records."""
    from mage_bench.runs import records_inputs_file

    records_inputs_file(Path(path)).unlink(missing_ok=True)
    atomic_write_json(path, [r.as_dict() for r in records])


def write_record_dicts(path: str | Path, records: list[dict[str, Any]]) -> None:
    """`write_records` for records already turned into dicts (and given fields no builder sets)."""
    from mage_bench.runs import records_inputs_file

    missing = [k for record in records for k in REQUIRED if k not in record]
    if missing:
        raise ValueError(f"records lack {sorted(set(missing))}")
    records_inputs_file(Path(path)).unlink(missing_ok=True)
    atomic_write_json(path, records)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    try:
        records = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read result records {path}: {exc}") from None
    if not isinstance(records, list):
        raise UserError(f"{path} must hold a JSON list of result records")
    for i, record in enumerate(records):
        missing = [k for k in REQUIRED if k not in record]
        if missing:
            raise UserError(f"{path}: record {i} lacks {', '.join(missing)}")
    return records
