"""Fréchet distance between Gaussian fits of two feature sets (FID when the features are Inception's).

features -> statistics (mean, unbiased covariance, as torch-fidelity) -> distance. The trace of the
matrix square root uses symmetric eigendecompositions, sqrt(S1) S2 sqrt(S1), so rank-deficient
covariances (N < D) stay finite and non-negative where a general eigen/sqrtm solver can go complex.
"""

from __future__ import annotations

import numpy as np

from mage_bench.errors import UserError
from mage_bench.eval import check_features


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) in float64; sigma is the unbiased covariance (N - 1), like torch-fidelity."""
    x = check_features("fid", features, min_rows=2)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _psd_eigenvalues(matrix: np.ndarray, vectors: bool = False):
    """Eigenvalues of a symmetric PSD matrix with round-off noise (|v| < n * eps * max) set to 0:
    square roots of that noise (~1e-8 each) would otherwise add up to a visible bias."""
    values, basis = np.linalg.eigh((matrix + matrix.T) / 2)
    tolerance = matrix.shape[0] * np.finfo(np.float64).eps * max(float(np.abs(values).max(initial=0.0)), 1e-300)
    values = np.where(values > tolerance, values, 0.0)
    return (values, basis) if vectors else values


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, basis = _psd_eigenvalues(matrix, vectors=True)
    return (basis * np.sqrt(values)) @ basis.T


def frechet_from_statistics(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))."""
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise UserError(f"fid: feature dimensions differ ({mu1.shape[0]} vs {mu2.shape[0]})")
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    tr_covmean = float(np.sqrt(_psd_eigenvalues(middle)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between the Gaussian fits of two feature sets [N, D] and [M, D]."""
    return frechet_from_statistics(*feature_statistics(feats_a), *feature_statistics(feats_b))
