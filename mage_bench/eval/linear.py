"""Linear probe on frozen features: multinomial logistic regression, L2 strength chosen on held-out data.

Protocol: standardise with training statistics; hold out a stratified 20% of the training split;
pick C from a grid by held-out top-1 (ties: the stronger regularisation); refit on the whole
training split; report top-1/top-5 on the test split. (The paper's LARS + BatchNorm head for GPU
users is a separate protocol.)
"""

from __future__ import annotations

import numpy as np

from mage_bench.errors import UserError
from mage_bench.eval import blas_threads_for, check_features, top1_top5

KEY_TOP1, KEY_TOP5 = "top1", "top5"
C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def _fit(x: np.ndarray, y: np.ndarray, c: float, seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x, y)


def _topk(model, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    scores = model.decision_function(x)
    if scores.ndim == 1:  # two classes
        scores = np.stack([-scores, scores], axis=1)
    return top1_top5(scores, y, model.classes_)


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 seed: int = 0, c_grid: tuple[float, ...] = C_GRID) -> dict[str, float]:
    """{"top1", "top5", "C", "val_top1"} of a logistic-regression probe."""
    train_x = check_features("linear", train_x, train_y, min_rows=2)
    test_x = check_features("linear", test_x, test_y)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    counts = np.bincount(train_y)
    if (counts[counts > 0] < 2).any():
        raise UserError("linear: every class needs at least 2 training images (one is held out to choose C)")
    with blas_threads_for(*train_x.shape, len(counts)):
        return _select_and_fit(train_x, train_y, test_x, test_y, seed, c_grid)


def _select_and_fit(train_x, train_y, test_x, test_y, seed, c_grid) -> dict[str, float]:
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

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


# --------------------------------------------------------------------------------------------
# The paper's protocol (MAE/MAGE linear probing), for GPU users with large data sets


def _lars_step(params, lr: float, momentum: float, weight_decay: float, trust: float, buffers: dict) -> None:
    """One LARS update as in the MAE/MAGE linear-probe code: matrices get weight decay and a layer-wise
    trust ratio trust * ||w|| / ||update||; vectors (biases, norms) take the plain momentum step."""
    import torch

    with torch.no_grad():
        for p in params:
            if p.grad is None:
                continue
            update = p.grad
            if p.ndim > 1:
                update = update.add(p, alpha=weight_decay)
                w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                ratio = torch.where((w_norm > 0) & (u_norm > 0), trust * w_norm / u_norm, torch.ones_like(w_norm))
                update = update * ratio
            buf = buffers.setdefault(p, torch.zeros_like(p))
            buf.mul_(momentum).add_(update)
            p.add_(buf, alpha=-lr)


def linear_probe_mae(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                     seed: int = 0, epochs: int = 90, warmup_epochs: int | None = None, batch_size: int = 4096,
                     blr: float = 0.1, device: str = "cpu") -> dict[str, float]:
    """{"top1", "top5", "lr", "epochs", "batch_size"}: BatchNorm1d(affine=False, eps 1e-6) + Linear
    (trunc-normal std 0.01, zero bias) trained with LARS (momentum 0.9, no weight decay), lr = blr *
    batch / 256, linear warmup then half-cycle cosine per iteration (REFERENCE.md: the paper's protocol).
    Warmup defaults to a ninth of the epochs: the paper's 10 of 90."""
    import math

    import torch
    import torch.nn.functional as F

    warmup_epochs = epochs // 9 if warmup_epochs is None else warmup_epochs
    train_x = check_features("linear-mae", train_x, train_y, min_rows=2)
    test_x = check_features("linear-mae", test_x, test_y)
    if epochs < 1 or batch_size < 1 or not 0 <= warmup_epochs <= epochs:
        raise UserError(f"linear-mae: needs epochs >= 1, batch >= 1 and 0 <= warmup <= epochs "
                        f"(got {epochs}, {batch_size}, {warmup_epochs})")
    generator = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(train_x, dtype=torch.float32, device=device)
    y = torch.as_tensor(np.asarray(train_y), dtype=torch.long, device=device)
    num_classes = int(max(np.max(train_y), np.max(test_y))) + 1
    norm = torch.nn.BatchNorm1d(x.shape[1], affine=False, eps=1e-6).to(device)
    head = torch.nn.Linear(x.shape[1], num_classes).to(device)
    with torch.no_grad():
        head.weight.copy_(torch.nn.init.trunc_normal_(torch.empty_like(head.weight, device="cpu"), std=0.01,
                                                      generator=generator).to(device))
        head.bias.zero_()
    lr = blr * batch_size / 256
    steps_per_epoch = math.ceil(len(x) / batch_size)
    buffers: dict = {}
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator).to(device)
        for i, batch in enumerate(order.split(batch_size)):
            progress = epoch + i / steps_per_epoch
            if progress < warmup_epochs:
                step_lr = lr * progress / warmup_epochs
            else:
                step_lr = lr * 0.5 * (1 + math.cos(math.pi * (progress - warmup_epochs) / max(epochs - warmup_epochs, 1)))
            norm.train(), head.train()
            loss = F.cross_entropy(head(norm(x[batch])), y[batch])
            head.zero_grad(set_to_none=True)
            loss.backward()
            _lars_step(list(head.parameters()), step_lr, 0.9, 0.0, 0.001, buffers)
    norm.eval(), head.eval()
    with torch.no_grad():
        scores = head(norm(torch.as_tensor(test_x, dtype=torch.float32, device=device))).cpu().numpy()
    top1, top5 = top1_top5(scores, test_y)
    return {KEY_TOP1: top1, KEY_TOP5: top5, "lr": lr, "epochs": epochs, "batch_size": batch_size}
