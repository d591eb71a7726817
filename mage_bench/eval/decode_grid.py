"""Decoding sweeps per checkpoint: `eval fid --fake RUN --profile P --decode temperature=3,4.5,6 steps=8,12,20`
and a sweep spec's `eval.decode_grid`.

MAGE's generation quality is very sensitive to the decoding temperature (LTH14/mage#15: the script's 4.5 vs the
README's 6.0). A decode grid evaluates every (steps, temperature) of the product once, under an evaluation
profile whose every other pinned setting holds: each setting's images are decoded into their own folder
(RUN/samples-s<steps>-t<temperature>, or RUN/samples for the run's own setting, kept and reused) and its
features extracted once (cached like any image set). The records are the profile's, with `decode_grid: true`,
`decode_steps` and `decode_temperature` saying which setting, and `profile_hash` the profile's own (the pinned
protocol the grid departs from only in decoding); they go to RUN/eval/fid-<profile>-decode.json, apart from the
profile's headline records, and the report draws the profile's first metric against temperature, one line per
step count, marking the best setting (`report.decoding`).
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

from mage_bench.errors import UserError

KEYS = {"steps": int, "temperature": float}  # what a grid may vary


def parse_decode(items: tuple[str, ...] | list[str]) -> dict[str, tuple[Any, ...]]:
    """`("temperature=3,4.5,6", "steps=8,12")` -> {"temperature": (3.0, 4.5, 6.0), "steps": (8, 12)}; every
    problem (unknown key, a key twice, a bad or repeated value, nothing given) is a one-line `UserError`."""
    grid: dict[str, tuple[Any, ...]] = {}
    if not items:
        raise UserError("--decode needs at least one KEY=V1,V2,... (temperature=3,4.5,6 steps=8,12,20)")
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or key not in KEYS:
            raise UserError(f"--decode {item!r}: give temperature=V1,V2,... or steps=N1,N2,...")
        if key in grid:
            raise UserError(f"--decode gives {key} twice; list its values once, comma-separated")
        try:
            parsed = tuple(KEYS[key](v) for v in values.split(",") if v.strip())
        except ValueError:
            raise UserError(f"--decode {item!r}: {key} values must be {KEYS[key].__name__}s") from None
        if not parsed:
            raise UserError(f"--decode {item!r} lists no value")
        if len(set(parsed)) != len(parsed):
            raise UserError(f"--decode {item!r} lists a value twice")
        if key == "steps" and min(parsed) < 1:
            raise UserError(f"--decode {item!r}: steps must be >= 1")
        if key == "temperature" and min(parsed) < 0:
            raise UserError(f"--decode {item!r}: temperature must be >= 0")
        grid[key] = parsed
    return grid


def grid_settings(grid: dict[str, tuple[Any, ...]], run: Any, profile: Any) -> list[tuple[int, float]]:
    """Every (steps, temperature) of the grid; a key the grid leaves out keeps the profile's pinned value (or
    the run's own when the profile pins none)."""
    steps = grid.get("steps") or (profile.decode_steps or run.config.generate.steps,)
    temperatures = grid.get("temperature") or (
        run.config.generate.temperature if profile.decode_temperature is None else profile.decode_temperature,)
    return list(itertools.product(steps, temperatures))


def records_name(profile: Any) -> str:
    from mage_bench.eval.profile_eval import records_name as profile_records

    return f"{profile_records(profile)}-decode"


def evaluate_decode_grid(run: Any, real: str | None, profile: Any, grid: dict[str, tuple[Any, ...]],
                         weights: str | None = None, device: str = "auto", cache_dir: str | Path | None = None,
                         progress: bool = False, sweep: str | None = None,
                         stream: bool = False) -> list[dict[str, Any]]:
    """The profile's metrics of `run` (a run folder or `LoadedRun`) at every decoding setting of `grid`; writes
    RUN/eval/fid-<profile>-decode.json and returns the records."""
    from mage_bench.eval.profile_eval import check_profile_inputs, evaluate_profile
    from mage_bench.results import write_record_dicts
    from mage_bench.runs import EVAL_DIR, LoadedRun, load_run, resolve_device

    profile, _, _ = check_profile_inputs(profile, real, weights, fake_is_run=True, progress=progress,
                                         allow_download=True)
    if not isinstance(run, LoadedRun):
        run = load_run(run, resolve_device(device))
    records: list[dict[str, Any]] = []
    for steps, temperature in grid_settings(grid, run, profile):
        variant = dataclasses.replace(profile, decode_steps=steps, decode_temperature=temperature)
        for record in evaluate_profile(run, real, variant, weights=weights, device=device, cache_dir=cache_dir,
                                       progress=progress, sweep=sweep, write=False, stream=stream):
            records.append({**record, "profile_hash": profile.hash, "decode_grid": True})
    write_record_dicts(run.path / EVAL_DIR / f"{records_name(profile)}.json", records)
    return records
