"""Few-shot classification: k labelled images per class, several seeded draws, mean and spread.

Features are L2-normalised; each draw fits a logistic regression (C = 1) on k images per class from
the training split and scores the whole test split. Per k: mean, std (ddof 1) and a 95% interval
(Student t) over the draws.
"""

from __future__ import annotations

import numpy as np

from mage_bench.errors import UserError
from mage_bench.eval import blas_threads_for, check_features, l2_normalise
from mage_bench.metrics import Metric

METRICS = (Metric("top1", True, "few-shot top-1"),)  # one record per shot count (its `shots` field)


def draw_support(labels: np.ndarray, shots: int, seed: int, draw: int) -> np.ndarray:
    """Indices of `shots` images per class, a pure function of (seed, shots, draw)."""
    rng = np.random.default_rng([seed, shots, draw])
    picks = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if members.size < shots:
            raise UserError(f"fewshot: class {cls} has {members.size} training images, fewer than {shots} shots")
        picks.append(rng.choice(members, size=shots, replace=False))
    return np.sort(np.concatenate(picks))


def few_shot(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
             shots: tuple[int, ...] = (1, 2, 5, 10), draws: int = 5, seed: int = 0) -> dict[int, dict[str, float]]:
    """{k: {"mean", "std", "ci_low", "ci_high", "draws", "accuracies"}} of top-1 accuracy."""
    if draws < 2:
        raise UserError(f"fewshot: needs at least 2 draws for a spread, got {draws}")

    train_x = l2_normalise(check_features("fewshot", train_x, train_y))
    test_x = l2_normalise(check_features("fewshot", test_x, test_y))
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    with blas_threads_for(len(test_x), test_x.shape[1], len(np.unique(train_y))):
        return _draws(train_x, train_y, test_x, test_y, shots, draws, seed)


def _draws(train_x, train_y, test_x, test_y, shots, draws, seed) -> dict[int, dict[str, float]]:
    from scipy import stats
    from sklearn.linear_model import LogisticRegression

    results: dict[int, dict[str, float]] = {}
    for k in shots:
        accuracies = []
        for draw in range(draws):
            support = draw_support(train_y, k, seed, draw)
            model = LogisticRegression(C=1.0, max_iter=2000).fit(train_x[support], train_y[support])
            accuracies.append(float((model.predict(test_x) == test_y).mean()))
        acc = np.array(accuracies)
        mean, std = float(acc.mean()), float(acc.std(ddof=1))
        half = float(stats.t.ppf(0.975, draws - 1) * std / np.sqrt(draws))
        results[k] = {"mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half,
                      "draws": draws, "accuracies": accuracies}
    return results
