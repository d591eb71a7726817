"""Linear probe on frozen features: multinomial logistic regression, L2 strength chosen on held-out data.

Protocol: standardise with training statistics; hold out a stratified 20% of the training split;
pick C from a grid by held-out top-1 (ties: the stronger regularisation); refit on the whole
training split; report top-1/top-5 on the test split.

Two solvers of the same objective (C * summed cross-entropy + ||W||^2 / 2, bias unpenalised) and the same
C search: scikit-learn's lbfgs (`sklearn-lbfgs`), and full-batch L-BFGS in torch on the evaluation device
(`torch-lbfgs`: float32, the loss summed over row chunks so memory stays at one copy of the features).
`solver="auto"` takes torch from TORCH_SOLVER_FROM training rows x classes on (ImageNet, 1.28M x 1,000,
needs hours and ~50 GB in scikit-learn), scikit-learn below (the digits, CIFAR-10, CIFAR-100 keep their
numbers). Every result names its solver (the records' `solver` field): the two agree to within
optimisation tolerance, not bitwise, so numbers of the two are never mixed silently.

The paper's protocol (BatchNorm + linear head trained with LARS) is below as one head-training
core, `train_mae_head`, shared by `linear_probe_mae` (fixed features: the `mae-cached` protocol)
and `mage_bench.eval.linear_views` (fresh augmented views every epoch: the faithful `mae` protocol).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from mage_bench.errors import UserError
from mage_bench.eval import SINGLE_THREAD_BELOW, blas_threads_for, check_features, top1_top5
from mage_bench.metrics import Metric
from mage_bench.schedule import warmup_cosine

METRICS = (Metric("top1", True, "linear probe top-1"), Metric("top5", True, "linear probe top-5"))
C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
SOLVERS = ("auto", "sklearn", "torch")
SOLVER_NAMES = {"sklearn": "sklearn-lbfgs", "torch": "torch-lbfgs"}  # what results and records say
TORCH_SOLVER_FROM = 10_000_000  # training rows x classes from which solver="auto" takes torch
TORCH_MAX_ITER = 1000  # L-BFGS iterations per fit (scikit-learn's path allows 2000 of its own)
TORCH_TOLERANCE = 1e-4  # stop at max |gradient| <= this, scikit-learn's `tol` on the same (mean) objective
TORCH_CHUNK_ROWS = 1 << 16  # rows per chunk of the loss: logits of [65,536, classes] at a time
CHECK_BLOCK_ROWS = 1 << 16  # rows per block when checking features for NaN without a float64 copy


def _fit(x: np.ndarray, y: np.ndarray, c: float, seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x, y)


def _topk(model, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    scores = model.decision_function(x)
    if scores.ndim == 1:  # two classes
        scores = np.stack([-scores, scores], axis=1)
    return top1_top5(scores, y, model.classes_)


def choose_solver(solver: str, rows: int, classes: int) -> str:
    """"sklearn" or "torch": `solver` itself, or for "auto" torch from TORCH_SOLVER_FROM rows x classes."""
    if solver not in SOLVERS:
        raise UserError(f"linear: unknown solver {solver!r}; use one of {', '.join(SOLVERS)}")
    if solver == "auto":
        return "torch" if rows * classes >= TORCH_SOLVER_FROM else "sklearn"
    return solver


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 seed: int = 0, c_grid: tuple[float, ...] = C_GRID, solver: str = "auto",
                 device: str = "cpu") -> dict[str, Any]:
    """{"top1", "top5", "C", "val_top1", "solver"} of a logistic-regression probe.

    `solver`: "sklearn", "torch" (on `device`) or "auto" (see the module doc); "solver" in the result is
    `SOLVER_NAMES` of the one used."""
    chosen = choose_solver(solver, len(np.asarray(train_y)), len(np.unique(np.asarray(train_y))))
    if chosen == "torch":  # checked in blocks: no float64 copy of ImageNet-sized features
        train_x = _checked_float32("linear", train_x, train_y, min_rows=2)
        test_x = _checked_float32("linear", test_x, test_y)
    else:
        train_x = check_features("linear", train_x, train_y, min_rows=2)
        test_x = check_features("linear", test_x, test_y)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    counts = np.bincount(train_y)
    if (counts[counts > 0] < 2).any():
        raise UserError("linear: every class needs at least 2 training images (one is held out to choose C)")
    if chosen == "torch":
        with _torch_threads_for(*train_x.shape, len(counts), device):
            result = _torch_select_and_fit(train_x, train_y, test_x, test_y, seed, c_grid, device)
    else:
        with blas_threads_for(*train_x.shape, len(counts)):
            result = _select_and_fit(train_x, train_y, test_x, test_y, seed, c_grid)
    return {**result, "solver": SOLVER_NAMES[chosen]}


def _checked_float32(name: str, x: Any, labels: Any, min_rows: int = 1) -> np.ndarray:
    """`check_features` without its float64 copy of the whole array: NaN/inf looked for in row blocks."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] < min_rows or np.shape(labels) != (x.shape[0],):
        check_features(name, x, labels, min_rows)  # raises its one-line error
    bad = np.concatenate([start + np.flatnonzero(~np.isfinite(x[start:start + CHECK_BLOCK_ROWS]).all(axis=1))
                          for start in range(0, len(x), CHECK_BLOCK_ROWS)])
    if bad.size:
        check_features(name, x[bad])  # raises, counting every bad row
    return x


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
    return {"top1": top1, "top5": top5, "C": -neg_c, "val_top1": best_val}


# --------------------------------------------------------------------------------------------
# The same probe in torch, for large data (solver="torch")


@contextlib.contextmanager
def _torch_threads_for(rows: int, dims: int, classes: int, device: str) -> Iterator[None]:
    """One torch CPU thread for small problems (as `blas_threads_for` does for scikit-learn: measured here,
    a digits-sized product ran 200x slower on two busy cores than on one), the default otherwise."""
    import torch

    if str(device).startswith("cuda") or rows * dims * max(classes, 1) >= SINGLE_THREAD_BELOW:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _torch_select_and_fit(train_x, train_y, test_x, test_y, seed, c_grid, device) -> dict[str, float]:
    """`_select_and_fit` with torch L-BFGS on `device`: the same held-out split (the same rows, by the same
    seeded stratified split), the same C rule, the refit on the whole training split."""
    import torch
    from sklearn.model_selection import train_test_split

    classes = np.unique(train_y)
    fit_rows, val_rows = train_test_split(np.arange(len(train_y)), test_size=0.2, stratify=train_y,
                                          random_state=seed)
    x = torch.from_numpy(np.ascontiguousarray(train_x, dtype=np.float32)).to(device)
    y = torch.from_numpy(np.searchsorted(classes, train_y)).to(device)
    fit_rows, val_rows = (torch.from_numpy(np.sort(r)).to(device) for r in (fit_rows, val_rows))
    scaler = _standardiser(x, fit_rows)
    val_scores = []
    for c in c_grid:
        head = _torch_fit(x, y, fit_rows, scaler, len(classes), c)
        val_scores.append((_torch_topk(head, scaler, x[val_rows], y[val_rows])[0], -c))
    best_val, neg_c = max(val_scores)
    all_rows = torch.arange(len(train_y), device=device)
    scaler = _standardiser(x, all_rows)
    head = _torch_fit(x, y, all_rows, scaler, len(classes), -neg_c)
    del x  # the training features leave the device before the test features come
    test = torch.from_numpy(np.ascontiguousarray(test_x, dtype=np.float32)).to(device)
    # Test labels absent from training can never be predicted: column -1 matches no prediction.
    position = np.searchsorted(classes, test_y).clip(0, len(classes) - 1)
    column = np.where(classes[position] == test_y, position, -1)
    top1, top5 = _torch_topk(head, scaler, test, torch.from_numpy(column).to(device))
    return {"top1": top1, "top5": top5, "C": -neg_c, "val_top1": best_val}


def _standardiser(x: Any, rows: Any) -> tuple[Any, Any]:
    """(mean, scale) float32 [D] of x[rows] as scikit-learn's StandardScaler has them (population std, 1 for
    constant columns), accumulated in float64 over row chunks."""
    import torch

    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for part in rows.split(TORCH_CHUNK_ROWS):
        total += x[part].double().sum(0)
    mean = total / len(rows)
    squares = torch.zeros_like(total)
    for part in rows.split(TORCH_CHUNK_ROWS):
        squares += ((x[part].double() - mean) ** 2).sum(0)
    std = (squares / len(rows)).sqrt()
    scale = torch.where(std < 10 * torch.finfo(torch.float64).eps, torch.ones_like(std), std)
    return mean.float(), scale.float()


def _torch_fit(x: Any, y: Any, rows: Any, scaler: tuple[Any, Any], num_classes: int, c: float) -> tuple[Any, Any]:
    """(W [K, D], b [K]) minimising mean cross-entropy + ||W||^2 / (2 C n) over x[rows] standardised: scikit-
    learn's C * sum + ||W||^2 / 2 divided by C n. From zeros, as scikit-learn starts: no seed needed."""
    import torch
    import torch.nn.functional as F

    mean, scale = scaler
    weight = torch.zeros(num_classes, x.shape[1], device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=TORCH_MAX_ITER, history_size=10,
                                  tolerance_grad=TORCH_TOLERANCE, tolerance_change=1e-9, line_search_fn="strong_wolfe")
    n, penalty = len(rows), 1.0 / (2.0 * c * len(rows))

    def closure() -> Any:
        optimiser.zero_grad()
        total = torch.zeros((), device=x.device)
        for part in rows.split(TORCH_CHUNK_ROWS):  # one chunk of logits at a time; gradients accumulate
            logits = ((x[part] - mean) / scale) @ weight.T + bias
            loss = F.cross_entropy(logits, y[part], reduction="sum") / n
            loss.backward()
            total += loss.detach()
        regulariser = penalty * (weight * weight).sum()
        regulariser.backward()
        return total + regulariser.detach()

    optimiser.step(closure)
    return weight.detach(), bias.detach()


def _torch_topk(head: tuple[Any, Any], scaler: tuple[Any, Any], x: Any, column: Any) -> tuple[float, float]:
    """Top-1/top-5 accuracy of the head on raw features x, `column` the label's class column (-1: none)."""
    import torch

    weight, bias = head
    mean, scale = scaler
    hits1 = hits5 = 0
    with torch.no_grad():
        for part, labels in zip(x.split(TORCH_CHUNK_ROWS), column.split(TORCH_CHUNK_ROWS), strict=True):
            scores = ((part - mean) / scale) @ weight.T + bias
            top = scores.topk(min(5, scores.shape[1]), dim=1).indices
            hits1 += int((top[:, 0] == labels).sum())
            hits5 += int((top == labels[:, None]).any(dim=1).sum())
    return hits1 / len(x), hits5 / len(x)


# --------------------------------------------------------------------------------------------
# The paper's protocol (MAE/MAGE linear probing): BatchNorm + linear head, LARS


@dataclass(frozen=True)
class HeadSchedule:
    """The head's optimisation settings (REFERENCE.md): lr = blr * batch / 256, linear warmup, then a
    half-cycle cosine per iteration. Warmup defaults to a ninth of the epochs: the paper's 10 of 90."""

    epochs: int = 90
    batch_size: int = 4096
    blr: float = 0.1
    warmup_epochs: int | None = None

    def checked(self, name: str) -> HeadSchedule:
        """This schedule with the warmup resolved; impossible settings are a one-line `UserError`."""
        warmup = self.epochs // 9 if self.warmup_epochs is None else self.warmup_epochs
        if self.epochs < 1 or self.batch_size < 1 or not 0 <= warmup <= self.epochs:
            raise UserError(f"{name}: needs epochs >= 1, batch >= 1 and 0 <= warmup <= epochs "
                            f"(got {self.epochs}, {self.batch_size}, {warmup})")
        return HeadSchedule(self.epochs, self.batch_size, self.blr, warmup)

    @property
    def lr(self) -> float:
        return self.blr * self.batch_size / 256

    def lr_at(self, progress: float) -> float:
        """The lr at `progress` epochs (fractional: the schedule moves every iteration)."""
        # angle_first: this schedule has always rounded pi * (progress - warmup) before dividing
        return warmup_cosine(progress, self.epochs, self.warmup_epochs or 0, self.lr, angle_first=True)

    def fields(self) -> dict[str, Any]:
        """What a result record says about the schedule."""
        return {"lr": self.lr, "epochs": self.epochs, "warmup_epochs": self.warmup_epochs,
                "batch_size": self.batch_size}


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


def _new_head(dim: int, num_classes: int, generator: Any, device: str) -> Any:
    """BatchNorm1d(affine=False, eps 1e-6) + Linear (trunc-normal std 0.01 drawn from `generator`, zero bias)."""
    import torch

    norm = torch.nn.BatchNorm1d(dim, affine=False, eps=1e-6)
    head = torch.nn.Linear(dim, num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.nn.init.trunc_normal_(torch.empty_like(head.weight), std=0.01, generator=generator))
        head.bias.zero_()
    return torch.nn.Sequential(norm, head).to(device)


# epoch -> the epoch's (features float[B, D], labels long[B]) batches, on the head's device
EpochBatches = Callable[[int], Iterable[tuple[Any, Any]]]


def train_mae_head(epoch_batches: EpochBatches, dim: int, num_classes: int, n_train: int, schedule: HeadSchedule,
                   generator: Any, device: str = "cpu", progress: bool = False) -> Any:
    """The trained BN + Linear head (eval mode) after `schedule.epochs` epochs of LARS (momentum 0.9, no
    weight decay, trust 0.001) on the batches `epoch_batches(epoch)` yields.

    `generator` draws the head's initial weights before the first epoch's batches are asked for, so a
    caller that also shuffles with it gets one reproducible stream. `n_train` sets the iterations per
    epoch of the lr schedule. `schedule` must be `checked`.
    """
    import torch.nn.functional as F
    from tqdm import tqdm

    probe = _new_head(dim, num_classes, generator, device)
    probe.train()
    steps_per_epoch = math.ceil(n_train / schedule.batch_size)
    buffers: dict = {}
    with tqdm(total=schedule.epochs * steps_per_epoch, desc="linear probe head", unit="step", file=sys.stderr,
              disable=not progress) as bar:
        for epoch in range(schedule.epochs):
            for i, (x, y) in enumerate(epoch_batches(epoch)):
                bar.update()
                if len(x) < 2:  # BatchNorm cannot take a training step on one row (a last batch of one)
                    continue
                loss = F.cross_entropy(probe(x), y)
                probe.zero_grad(set_to_none=True)
                loss.backward()
                _lars_step(list(probe.parameters()), schedule.lr_at(epoch + i / steps_per_epoch), 0.9, 0.0, 0.001,
                           buffers)
    return probe.eval()


def head_result(probe: Any, test_x: Any, test_y: np.ndarray, schedule: HeadSchedule) -> dict[str, Any]:
    """{"top1", "top5", "lr", "epochs", "warmup_epochs", "batch_size"} of a trained head on test features."""
    import torch

    with torch.no_grad():
        scores = probe(test_x).cpu().numpy()
    top1, top5 = top1_top5(scores, np.asarray(test_y))
    return {"top1": top1, "top5": top5, **schedule.fields()}


def linear_probe_mae(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                     seed: int = 0, epochs: int = 90, warmup_epochs: int | None = None, batch_size: int = 4096,
                     blr: float = 0.1, device: str = "cpu", progress: bool = False) -> dict[str, Any]:
    """The paper's head trained on FIXED features (the `mae-cached` protocol: every epoch reuses the
    same feature per image, no augmentation); see `train_mae_head` and `HeadSchedule`.

    Returns {"top1", "top5", "lr", "epochs", "warmup_epochs", "batch_size"}. One seeded generator draws
    the head's weights, then each epoch's shuffle.
    """
    import torch

    schedule = HeadSchedule(epochs, batch_size, blr, warmup_epochs).checked("linear-mae-cached")
    train_x = check_features("linear-mae-cached", train_x, train_y, min_rows=2)
    test_x = check_features("linear-mae-cached", test_x, test_y)
    generator = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(train_x, dtype=torch.float32, device=device)
    y = torch.as_tensor(np.asarray(train_y), dtype=torch.long, device=device)

    def epoch_batches(epoch: int) -> Iterable[tuple[Any, Any]]:
        order = torch.randperm(len(x), generator=generator).to(device)
        return ((x[batch], y[batch]) for batch in order.split(schedule.batch_size))

    num_classes = int(max(np.max(train_y), np.max(test_y))) + 1
    probe = train_mae_head(epoch_batches, x.shape[1], num_classes, len(x), schedule, generator, device, progress)
    return head_result(probe, torch.as_tensor(test_x, dtype=torch.float32, device=device), test_y, schedule)
