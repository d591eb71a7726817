"""Evaluators as pure functions on features (NumPy float [N, D], integer labels [N]).

Each returns a dict of metric name -> value; wiring to runs, caches and the CLI comes on top.
"""

from __future__ import annotations

import numpy as np

from mage_bench.errors import UserError


def check_features(name: str, x: np.ndarray, labels: np.ndarray | None = None, min_rows: int = 1) -> np.ndarray:
    """Features as float64 [N, D]; NaN/inf, wrong ranks and mismatched labels are one-line errors."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise UserError(f"{name}: features must be a 2-D array [N, D], got shape {x.shape}")
    if x.shape[0] < min_rows:
        raise UserError(f"{name}: needs at least {min_rows} feature rows, got {x.shape[0]}")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise UserError(f"{name}: {bad} feature rows contain NaN or inf; the model or extractor diverged")
    if labels is not None and np.asarray(labels).shape != (x.shape[0],):
        raise UserError(f"{name}: {x.shape[0]} feature rows but labels of shape {np.asarray(labels).shape}")
    return x.astype(np.float64, copy=False)


def row_blocks(rows: int, columns: int, elements: int) -> list[slice]:
    """Slices of `rows` rows such that a block of rows x `columns` pairwise values holds at most `elements`
    (at least one row a block): how PRDC and CMMD bound their memory on 50k x 50k sets."""
    step = max(1, elements // max(columns, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def top1_top5(scores: np.ndarray, labels: np.ndarray, classes: np.ndarray | None = None) -> tuple[float, float]:
    """Accuracy of the highest score and of the five highest, per row of `scores` [N, C].

    Column j is class `classes[j]` (default j). Ties go to the lower column (stable sort)."""
    ranking = np.argsort(-scores, axis=1, kind="stable")
    if classes is not None:
        ranking = np.asarray(classes)[ranking]
    labels = np.asarray(labels)
    return float((ranking[:, 0] == labels).mean()), float((ranking[:, :5] == labels[:, None]).any(axis=1).mean())


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# Measured on the 2-core CI machine: scikit-learn's lbfgs logistic regression ran 1.7x (20,000 x 768)
# to 12x (1,437 x 64) faster with one OpenBLAS thread than with two; thread hand-offs cost more than
# these products. Larger problems (ImageNet features) keep every BLAS thread.
SINGLE_THREAD_BELOW = 2e8  # rows x dims x classes


def blas_threads_for(rows: int, dims: int, classes: int):
    """A context manager: one BLAS thread for small problems, the default otherwise."""
    import contextlib

    from threadpoolctl import threadpool_limits

    if rows * dims * max(classes, 1) < SINGLE_THREAD_BELOW:
        return threadpool_limits(1, user_api="blas")
    return contextlib.nullcontext()
