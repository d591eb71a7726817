"""Atomic writes, hashing, safe checkpoint loading and provenance.

Every result or checkpoint write goes through a temporary file in the same folder followed by
`os.replace`, so a crash or `kill -9` leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from mage_bench.errors import CheckpointError


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of `path` for writing; on success fsync and rename it onto `path`."""
    with _staged(path, mode, os.replace) as handle:
        yield handle


@contextlib.contextmanager
def _staged(path: str | os.PathLike, mode: str, publish: Any) -> Iterator[IO]:
    """Write a temporary sibling of `path`, fsync it, then `publish(tmp, path)`; the temporary file never
    outlives the call."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results and reports are meant to be shared
        publish(tmp, str(path))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_npy_save(path: str | os.PathLike, array: Any) -> None:
    """`numpy.save` of `array` to `path`, atomically."""
    import numpy as np

    with atomic_open(path, "wb") as handle:
        np.save(handle, array)


@contextlib.contextmanager
def atomic_memmap(path: str | os.PathLike, shape: tuple[int, ...], dtype: Any) -> Iterator[Any]:
    """A memory-mapped .npy to fill in place (memory stays flat in its size), published onto `path` only
    when the block ends without an error; a failure removes the partial file."""
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        yield array
        array.flush()
        del array  # closes the mapping before the rename
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A staging sibling of folder `path` to fill; published onto `path` when the block ends without an
    error. Publishing is idempotent: when another process published `path` first (runs sharing a cache
    reach the same reference together), the staged copy is discarded and theirs is kept."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield staging
        try:
            os.rename(staging, path)  # atomic; fails when `path` exists (as a non-empty folder)
        except OSError:
            if not path.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


_UNSAFE = re.compile(r"[^a-z0-9._-]+")


def slug(text: str, limit: int = 40, empty: str = "point") -> str:
    """A file name from user text: lower-case ASCII letters, digits, '.', '_' and '-' only; never
    empty, never '.' or '..', so it cannot leave the folder it is joined to."""
    out = _UNSAFE.sub("-", text.lower()).strip("-.")[:limit].strip("-.")
    return out or empty


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set and restore
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    with atomic_open(path, "wb") as handle:
        torch.save(obj, handle)


def check_output_folder(out: Path, state: Path, resume: bool, folder_hint: str, state_name: str) -> None:
    """A trainer's --out must be a folder, and one holding a training state is continued only with --resume."""
    from mage_bench.errors import UserError

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give {folder_hint}")
    if state.exists() and not resume:
        raise UserError(f"{out} already holds {state_name}; pass --resume to continue it or choose another --out")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON-lines log (a run's metrics.jsonl), blank lines skipped; [] when there is no file."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rewind_jsonl(path: str | os.PathLike, step: int) -> None:
    """Drop log lines with "step" beyond `step` (written after the checkpoint being resumed)."""
    path = Path(path)
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def safe_torch_load(path: str | os.PathLike) -> Any:
    """`torch.load(..., weights_only=True)` with one-line errors for missing or unsafe files.

    `argparse.Namespace` is allowed explicitly: official MAGE checkpoints store their training
    arguments that way, and a Namespace holds only plain values, so allowing it runs no code.
    Anything else that would need arbitrary unpickling is refused, never loaded unsafely.
    """
    import argparse
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"refusing to load {path}: it needs unsafe unpickling (would run code): {first}; "
            "re-save it as a plain state_dict of tensors"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}; is it a torch checkpoint?") from None


def _summarise(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def check_state_dict(model: Any, state_dict: Mapping[str, Any], source: str) -> None:
    """Raise a `CheckpointError` listing every missing, unexpected and mis-shaped key of `state_dict` against
    `model` (a module with a `config.name`), so strict loading fails with the whole picture at once."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(getattr(v, "shape", ())) for k, v in state_dict.items()}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mis_shaped = sorted(f"{k} {given[k]} != {expected[k]}" for k in set(expected) & set(given) if given[k] != expected[k])
    problems = []
    if missing:
        problems.append(f"missing keys: {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_summarise(unexpected)}")
    if mis_shaped:
        problems.append(f"wrong shapes: {_summarise(mis_shaped)}")
    if problems:
        raise CheckpointError(f"{source} does not match the {model.config.name} architecture: " + "; ".join(problems))


@functools.lru_cache(maxsize=8)
def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """The commit of the checkout holding the package (with '-dirty' when modified), or None.

    Asked once per process: the code that runs is the code imported at start, and every result
    record would otherwise pay two git subprocesses."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where, capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour changes our numbers (a fresh dict each call)."""
    return dict(_package_versions())


@functools.lru_cache(maxsize=1)
def _package_versions() -> dict[str, str]:
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in ("mage-bench", "torch", "torchvision", "numpy", "scipy", "scikit-learn", "torch-fidelity",
                 "clean-fid", "faiss-cpu", "faiss-gpu"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def atomic_create(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Like `atomic_open`, for a file whose content is a function of its name (a cache entry): publishing
    is first-writer-wins. When another process published `path` while this one was writing, the copy
    written here is discarded and theirs is kept, so every reader of the name sees one and the same file."""
    with _staged(path, mode, _publish_first) as handle:
        yield handle


def _publish_first(tmp: str, path: str) -> None:
    try:
        os.link(tmp, path)  # atomic and refuses an existing name, unlike os.replace
    except FileExistsError:
        pass  # published first by another process: keep theirs
    except OSError:  # a file system without hard links: replacing is still atomic, only not first-wins
        if not os.path.exists(path):
            os.replace(tmp, path)


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make the renames into `folder` durable (a folder's entries are data of the folder itself)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
