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

from mage_bench.errors import UserError
from mage_bench.io import atomic_write_json, git_commit, package_versions, utc_now

REQUIRED = ("sweep", "run", "evaluator", "metric", "value", "higher_is_better", "n_samples", "dataset", "split",
            "feature_extractor", "seed", "config_hash", "git_commit", "versions", "created_at")


def config_hash(config: Any) -> str:
    """sha256 of the resolved config as canonical JSON (what makes two runs the same run)."""
    from mage_bench.config import to_dict

    return hashlib.sha256(json.dumps(to_dict(config), sort_keys=True).encode()).hexdigest()


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


def write_records(path: str | Path, records: list[ResultRecord]) -> None:
    atomic_write_json(path, [r.as_dict() for r in records])


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
