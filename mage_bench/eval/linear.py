"""Linear probe on frozen features: multinomial logistic regression, L2 strength chosen on held-out data.

Protocol: standardise with training statistics; hold out a stratified 20% of the training split;
pick C from a grid by held-out top-1 (ties: the stronger regularisation); refit on the whole
training split; report top-1/top-5 on the test split. (The paper's LARS + BatchNorm head for GPU
users is a separate protocol.)
"""

from __future__ import annotations

import numpy as np

from mage_bench.errors import UserError
from mage_bench.eval import check_features

KEY_TOP1, KEY_TOP5 = "top1", "top5"
C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def _fit(x: np.ndarray, y: np.ndarray, c: float, seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x, y)


def _topk(model, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    scores = model.decision_function(x)
    if scores.ndim == 1:  # two classes
        scores = np.stack([-scores, scores], axis=1)
    ranking = model.classes_[np.argsort(-scores, axis=1, kind="stable")]
    return float((ranking[:, 0] == y).mean()), float((ranking[:, :5] == y[:, None]).any(axis=1).mean())


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 seed: int = 0, c_grid: tuple[float, ...] = C_GRID) -> dict[str, float]:
    """{"top1", "top5", "C", "val_top1"} of a logistic-regression probe."""
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    train_x = check_features("linear", train_x, train_y, min_rows=2)
    test_x = check_features("linear", test_x, test_y)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    counts = np.bincount(train_y)
    if (counts[counts > 0] < 2).any():
        raise UserError("linear: every class needs at least 2 training images (one is held out to choose C)")
    fit_x, val_x, fit_y, val_y = train_test_split(train_x, train_y, test_size=0.2, stratify=train_y,
                                                  random_state=seed)
    scaler = StandardScaler().fit(fit_x)
    val_scores = [(_topk(_fit(scaler.transform(fit_x), fit_y, c, seed), scaler.transform(val_x), val_y)[0], -c)
                  for c in c_grid]
    best_val, neg_c = max(val_scores)
    scaler = StandardScaler().fit(train_x)
    model = _fit(scaler.transform(train_x), train_y, -neg_c, seed)
    top1, top5 = _topk(model, scaler.transform(test_x), test_y)
    return {KEY_TOP1: top1, KEY_TOP5: top5, "C": -neg_c, "val_top1": best_val}
