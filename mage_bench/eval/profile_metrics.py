"""A profile's metrics from two feature sets, with sample-level bootstrap intervals.

Point values: FD (`fid.frechet_distance`: equal to torch-fidelity's FID of the same features to ~1e-9
relative, and finite where its general eigensolver is not), KD and IS through torch-fidelity's own functions
on the features (its subsets and splits, seeded), precision/recall at `pr_k` and density/coverage at `dc_k`
(`prdc`: the `prdc` package's numbers; a sample exactly on a ball's edge counts as outside, where torch-fidelity's
precision/recall counts it inside: the two differ only when features repeat), CMMD (`cmmd`, on unit-norm
embeddings when the profile says so, as the published code does).

Bootstrap (`profile.bootstrap` resamples, seeded): generated images are drawn with replacement, and real
images too when the reference is a set of images (a statistics file's moments and reference features are held
fixed, so recall and coverage, means over the reference's samples, get no interval there). FD and KD are
recomputed on each resample
(two symmetric eigendecompositions each); for KD and CMMD one pass over each kernel matrix gives every resample
at once (count-weighted sums: `cmmd.cmmd_resampled`, `_polynomial_mmd_resampled`; KD's is the spread of the
full-set unbiased MMD that its subset mean estimates, the subsets' own spread is its `std`); for
precision/recall/density/coverage the k-NN balls of the full sets are held fixed and the per-sample terms are
resampled (re-deriving radii from a resample with duplicates would shrink them). The interval is the
2.5-97.5 percentile spread placed around the estimate (`_interval`: resampling adds FD/KD/CMMD's small-sample
bias a second time, which moves the raw percentiles but not their spread); records carry `ci_low`/`ci_high`,
`bootstrap` (the count), `bootstrap_shift` (median of the resamples minus the estimate) and `bootstrap_s`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from mage_bench.errors import UserError

LEVEL = 0.95


@dataclass(frozen=True)
class Side:
    """One side's features (float [N, D]) and, for classifier extractors, logits (float [N, C])."""

    features: np.ndarray | None  # None: a statistics file without reference images
    logits: np.ndarray | None = None
    moments: tuple[np.ndarray, np.ndarray] | None = None  # (mu, sigma) of a statistics file


def kid_subset_size(profile: Any, n_real: int, n_fake: int) -> int:
    return min(profile.kid_subset_size, n_real, n_fake)


def _kid(real: np.ndarray, fake: np.ndarray, profile: Any, seed: int) -> tuple[float, float]:
    import torch
    from torch_fidelity.metric_kid import kid_features_to_metric

    out = kid_features_to_metric(torch.from_numpy(np.array(fake)), torch.from_numpy(np.array(real)), kid_subsets=profile.kid_subsets,
                                 kid_subset_size=kid_subset_size(profile, len(real), len(fake)), rng_seed=seed,
                                 verbose=False)
    return out["kernel_inception_distance_mean"], out["kernel_inception_distance_std"]


def _is(logits: np.ndarray, profile: Any, seed: int) -> tuple[float, float]:
    import torch
    from torch_fidelity.metric_isc import isc_features_to_metric

    out = isc_features_to_metric(torch.from_numpy(np.array(logits)), splits=profile.isc_splits,
                                 shuffle=True, rng_seed=seed)
    return out["inception_score_mean"], out["inception_score_std"]


def _fd(real: Side, fake: np.ndarray) -> float:
    from mage_bench.eval.fid import feature_statistics, frechet_distance, frechet_from_statistics

    if real.moments is not None:
        mu, sigma = feature_statistics(fake)
        if mu.shape != real.moments[0].shape:
            raise UserError(f"the statistics file holds {real.moments[0].shape[0]}-d moments, but the extractor gives "
                            f"{mu.shape[0]}-d features: use the extractor the file was made with")
        return frechet_from_statistics(mu, sigma, *real.moments)
    return frechet_distance(fake, real.features)


def _interval(estimate: float, values: np.ndarray) -> tuple[float, float, float]:
    """(low, high, shift): the bootstrap distribution's 2.5-97.5 percentile spread placed around the estimate,
    and how far its median lies from the estimate. Resampling with replacement duplicates images, which adds
    to FD/KD/CMMD the same small-sample bias the estimate itself carries (a second time): the raw percentiles
    move by that bias while their spread measures the sample-level uncertainty. `shift` shows the move. Placed
    around a small FD/KD/CMMD (a held-out floor near 0), `low` can be negative: it is a spread, not a bound."""
    low, median, high = np.percentile(values, [50 * (1 - LEVEL), 50, 100 - 50 * (1 - LEVEL)])
    # min/max: a zero spread must give [estimate, estimate] exactly, not a rounding error either side
    return (min(float(estimate + low - median), estimate), max(float(estimate + high - median), estimate),
            float(median - estimate))


def _polynomial_mmd_resampled(x: np.ndarray, y: np.ndarray, wx: np.ndarray, wy: np.ndarray) -> np.ndarray:
    """[B]: the unbiased MMD^2 with KID's kernel ((x.y / D + 1)^3) of each resample, given as counts [B, N]
    and [B, M]; one pass over each kernel matrix for all resamples. Pairs of an image with itself are left out
    of the within-set sums (the unbiased estimator), copies of one image drawn twice are not (they are two
    draws)."""
    import torch

    from mage_bench.eval import row_blocks

    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
    wxt, wyt = torch.from_numpy(wx.astype(np.float64)), torch.from_numpy(wy.astype(np.float64))
    dim = x.shape[1]

    def weighted_sum(a, b, wa, wb, same: bool) -> torch.Tensor:
        total = torch.zeros(wa.shape[0], dtype=torch.float64)
        for rows in row_blocks(a.shape[0], b.shape[0], 2**24):
            kernel = (a[rows] @ b.T / dim + 1) ** 3
            total += ((wa[:, rows] @ kernel) * wb).sum(dim=1)
            if same:  # minus each draw paired with itself: sum_i w_i k(x_i, x_i)
                diagonal = kernel[torch.arange(kernel.shape[0]), torch.arange(rows.start, rows.stop)]
                total -= wa[:, rows] @ diagonal
        return total

    n, m = wx[0].sum(), wy[0].sum()
    xx = weighted_sum(xt, xt, wxt, wxt, True) / (n * (n - 1))
    yy = weighted_sum(yt, yt, wyt, wyt, True) / (m * (m - 1))
    xy = weighted_sum(xt, yt, wxt, wyt, False) / (n * m)
    return (xx + yy - 2 * xy).numpy()


def check_sizes(profile: Any, n_real: int | None, n_fake: int) -> None:
    """One-line errors for set sizes a profile's metrics cannot use (before any feature is extracted)."""
    need = {"fid": 2, "kid": 2, "is": profile.isc_splits, "precision": profile.pr_k + 1,
            "recall": profile.pr_k + 1, "density": profile.dc_k + 1, "coverage": profile.dc_k + 1, "cmmd": 1}
    for metric in profile.metrics:
        if n_fake < need[metric]:
            raise UserError(f"{metric} needs at least {need[metric]} generated images, got {n_fake}: raise num_samples")
        if n_real is not None and metric != "is" and n_real < need[metric]:
            raise UserError(f"{metric} needs at least {need[metric]} reference images, got {n_real}")


def profile_metrics(profile: Any, real: Side, fake: Side, seed: int) -> dict[str, dict[str, Any]]:
    """{metric: {"value", ...fields}} for every metric of `profile`, with bootstrap intervals."""
    fake_x = np.asarray(fake.features, dtype=np.float64)
    real_x = None if real.features is None else np.asarray(real.features, dtype=np.float64)
    check_sizes(profile, None if real_x is None else len(real_x), len(fake_x))
    wanted = set(profile.metrics)
    out: dict[str, dict[str, Any]] = {}
    if "fid" in wanted:
        out["fid"] = {"value": _fd(real, fake_x)}
    if "is" in wanted:
        value, std = _is(np.asarray(fake.logits), profile, seed)
        out["is"] = {"value": value, "std": std, "isc_splits": profile.isc_splits}
    if "kid" in wanted:
        # torch-fidelity's kernel on the features as extracted (float32), so KD is its KID to the last digit
        value, std = _kid(np.asarray(real.features), np.asarray(fake.features), profile, seed)
        out["kid"] = {"value": value, "std": std, "kid_subset_size": kid_subset_size(profile, len(real_x),
                                                                                    len(fake_x)),
                      "kid_subsets": profile.kid_subsets}
    prdc_wanted = wanted & {"precision", "recall", "density", "coverage"}
    terms: dict[str, np.ndarray] = {}
    if prdc_wanted:
        if real_x is None:
            raise UserError(f"{', '.join(sorted(prdc_wanted))} need the reference's images or features; the "
                            "statistics file holds moments only (LTH14/mar#91: never against mu/sigma)")
        from mage_bench.eval.prdc import prdc_per_sample

        ks = {profile.pr_k for m in prdc_wanted if m in ("precision", "recall")}
        ks |= {profile.dc_k for m in prdc_wanted if m in ("density", "coverage")}
        per_k = prdc_per_sample(real_x, fake_x, ks)  # only the k a wanted metric uses (`check_sizes` checked it)
        for metric in prdc_wanted:
            k = profile.pr_k if metric in ("precision", "recall") else profile.dc_k
            terms[metric] = per_k[k][metric].double().numpy()
            out[metric] = {"value": float(terms[metric].mean()), "k": k}
    if "cmmd" in wanted:
        from mage_bench.eval import l2_normalise
        from mage_bench.eval.cmmd import cmmd

        if profile.cmmd_normalise:
            real_x_c, fake_x_c = l2_normalise(real_x), l2_normalise(fake_x)
        else:
            real_x_c, fake_x_c = real_x, fake_x
        out["cmmd"] = {"value": cmmd(real_x_c, fake_x_c, sigma=profile.cmmd_sigma),
                       "cmmd_sigma": profile.cmmd_sigma, "cmmd_normalise": profile.cmmd_normalise}
    if profile.bootstrap:
        _bootstrap(profile, real, real_x, fake_x, terms, out, seed)
    return out


def _bootstrap(profile: Any, real: Side, real_x: np.ndarray | None, fake_x: np.ndarray,
               terms: dict[str, np.ndarray], out: dict[str, dict[str, Any]], seed: int) -> None:
    """Adds ci_low/ci_high/bootstrap/bootstrap_s to the metrics of `out` that get intervals."""
    rng = np.random.default_rng(seed)
    b = profile.bootstrap
    m = len(fake_x)
    fake_idx = rng.integers(0, m, size=(b, m))
    resample_real = real_x is not None and real.moments is None
    real_idx = rng.integers(0, len(real_x), size=(b, len(real_x))) if resample_real else None

    def record(metric: str, values: np.ndarray, start: float) -> None:
        low, high, shift = _interval(out[metric]["value"], values)
        out[metric].update(ci_low=low, ci_high=high, bootstrap=b, bootstrap_shift=shift,
                           bootstrap_s=round(time.perf_counter() - start, 3), bootstrap_real=resample_real)

    def counts(idx: np.ndarray, size: int) -> np.ndarray:
        return np.stack([np.bincount(row, minlength=size) for row in idx])

    def real_of(i: int) -> Side:
        if real.moments is not None or real_idx is None:
            return real
        return Side(real_x[real_idx[i]])

    if "fid" in out:
        start = time.perf_counter()
        record("fid", np.array([_fd(real_of(i), fake_x[fake_idx[i]]) for i in range(b)]), start)
    if "kid" in out:
        start = time.perf_counter()
        record("kid", _polynomial_mmd_resampled(real_x, fake_x, counts(real_idx, len(real_x)),
                                                counts(fake_idx, len(fake_x))), start)
    for metric, values in terms.items():
        start = time.perf_counter()
        idx = fake_idx if metric in ("precision", "density") else real_idx
        if idx is None:
            continue
        record(metric, values[idx].mean(axis=1), start)
    if "cmmd" in out and real_idx is not None:
        from mage_bench.eval import l2_normalise
        from mage_bench.eval.cmmd import cmmd_resampled

        start = time.perf_counter()
        x, y = (l2_normalise(real_x), l2_normalise(fake_x)) if profile.cmmd_normalise else (real_x, fake_x)
        record("cmmd", cmmd_resampled(x, y, counts(real_idx, len(x)), counts(fake_idx, len(y)),
                                      sigma=profile.cmmd_sigma), start)
