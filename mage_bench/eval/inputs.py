"""What an evaluation reads (the run's data settings, its data sets listed once) and what its records were
computed from (resume).

Next to each RUN/eval/NAME.json, RUN/eval/inputs/NAME.json records what the records were computed from (the
checkpoint's sha256, the run's config hash, run and sweep names, the data config and the data sets'
identities, and the evaluator's own settings), written after the records; writing records removes it
(`results.write_records`, whoever writes them: `eval fid` too), so it never vouches for records made from
other inputs. An evaluator whose records and matching inputs exist is not run again; its records are read
back. The inputs live in a subfolder because everything matching RUN/eval/*.json is read as result records.
The code version is not part of the inputs: after changing an evaluator's code, evaluate without `resume`.
Shared by the evaluators on features (`runner`), generation and inpainting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mage_bench.config import DataConfig, EvalConfig

INPUTS_VERSION = 1  # bump when what the inputs name changes


def run_data_config(config: Any, name: str | None = None) -> DataConfig:
    """A run config's data settings, optionally pointed at another data set of that layout."""
    import dataclasses

    return dataclasses.replace(config.data, name=name) if name else config.data


def evaluation_datasets(data: DataConfig, splits: tuple[str, ...]) -> dict[str, Any]:
    """{split: the split's evaluation data set}, each listed once."""
    from mage_bench.data import create_dataset

    return {split: create_dataset(data, split, train_transform=False) for split in splits}


def identities_of(datasets: dict[str, Any]) -> dict[str, str]:
    """{split: `data.dataset_identity`} of data sets listed already (their resolved paths and file listings)."""
    from mage_bench.data import dataset_identity

    return {split: dataset_identity(dataset) for split, dataset in datasets.items()}


def dataset_identities(data: DataConfig, splits: tuple[str, ...]) -> dict[str, str]:
    """{split: `data.dataset_identity`} of the data set's splits."""
    return identities_of(evaluation_datasets(data, splits))


def evaluation_inputs(run: Any, name: str, data: DataConfig, identities: dict[str, str], settings: EvalConfig,
                      sweep: str | None, run_hash: str, fields: tuple[str, ...],
                      **extra: Any) -> dict[str, Any]:
    """Everything evaluator `name`'s records on `run` depend on, as JSON-ready values (see the module doc)."""
    from mage_bench.data import pixel_settings

    return {"version": INPUTS_VERSION, "evaluator": name, "checkpoint_sha256": run.checkpoint_sha256,
            "config_hash": run_hash, "run": run.path.name, "sweep": sweep, "data": pixel_settings(data),
            "datasets": identities, "settings": {f: getattr(settings, f) for f in fields}, **extra}


def _inputs_digest(inputs: dict[str, Any]) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def records_path(run: Any, name: str) -> Path:
    """RUN/eval/NAME.json, the evaluator's result records."""
    from mage_bench.runs import EVAL_DIR

    return run.path / EVAL_DIR / f"{name}.json"


def inputs_path(run: Any, name: str) -> Path:
    """RUN/eval/inputs/NAME.json, what RUN/eval/NAME.json was computed from."""
    from mage_bench.runs import records_inputs_file

    return records_inputs_file(records_path(run, name))


def inputs_match(run: Any, name: str, inputs: dict[str, Any]) -> bool:
    """Whether RUN/eval/NAME.json exists and its inputs file says it was computed from `inputs`."""
    import json

    path = inputs_path(run, name)
    if not (records_path(run, name).is_file() and path.is_file()):
        return False
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False  # unreadable: recompute
    return isinstance(stored, dict) and stored.get("digest") == _inputs_digest(inputs)


def remember_inputs(run: Any, name: str, inputs: dict[str, Any]) -> None:
    """Write NAME's inputs file atomically; call it after the records are written."""
    from mage_bench.io import atomic_write_json

    atomic_write_json(inputs_path(run, name), {"digest": _inputs_digest(inputs), "inputs": inputs})
