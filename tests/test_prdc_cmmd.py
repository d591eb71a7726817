"""PRDC and CMMD on feature arrays, each against an independent reference: the authors' `prdc` package, and a
NumPy transcription of the published CMMD code's formula (google-research/cmmd, distance.py)."""

import numpy as np
import pytest

from mage_bench.eval import cmmd as cmmd_module
from mage_bench.eval import prdc as prdc_module
from mage_bench.eval.cmmd import cmmd
from mage_bench.eval.prdc import prdc, prdc_at


def _features(seed, n, dim=16, shift=0.0):
    return np.random.default_rng(seed).normal(shift, 1.0, (n, dim)).astype(np.float32)


def published_cmmd(x, y, sigma=10.0, scale=1000.0):
    """The published `mmd(x, y)` written out in NumPy (float64): means over every kernel entry."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    x_sq, y_sq = np.diag(x @ x.T), np.diag(y @ y.T)
    gamma = 1 / (2 * sigma**2)
    k_xx = np.mean(np.exp(-gamma * (-2 * x @ x.T + x_sq[:, None] + x_sq[None, :])))
    k_xy = np.mean(np.exp(-gamma * (-2 * x @ y.T + x_sq[:, None] + y_sq[None, :])))
    k_yy = np.mean(np.exp(-gamma * (-2 * y @ y.T + y_sq[:, None] + y_sq[None, :])))
    return scale * (k_xx + k_yy - 2 * k_xy)


@pytest.mark.parametrize("n_real, n_fake, shift, k", [(120, 120, 0.0, 5), (150, 90, 0.7, 3), (60, 200, 1.5, 5)])
def test_prdc_matches_the_authors_package(n_real, n_fake, shift, k, monkeypatch, capsys):
    reference = pytest.importorskip("prdc")
    real, fake = _features(0, n_real), _features(1, n_fake, shift=shift)
    expected = reference.compute_prdc(real, fake, nearest_k=k)
    capsys.readouterr()  # the package prints its sample counts
    monkeypatch.setattr(prdc_module, "BLOCK_ELEMENTS", 1000)  # many row blocks: the blocking changes nothing
    got = prdc(real, fake, nearest_k=k)
    # The package's float32 distances and our float64 ones may round a near-tie differently: at most one sample.
    for name, value in expected.items():
        assert got[name] == pytest.approx(float(value), abs=1.0 / min(n_real, n_fake) + 1e-12), name


def test_prdc_at_several_k_equals_one_k_at_a_time():
    real, fake = _features(2, 100), _features(3, 80, shift=0.3)
    both = prdc_at(real, fake, [3, 5])
    assert both[3] == prdc(real, fake, 3) and both[5] == prdc(real, fake, 5)


def test_prdc_of_a_set_against_itself_and_against_a_far_one():
    real = _features(4, 100)
    same = prdc(real, real, 5)
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["coverage"] == 1.0
    far = prdc(real, _features(5, 100, shift=50.0), 5)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


@pytest.mark.parametrize("n_real, n_fake, shift", [(100, 100, 0.0), (80, 130, 0.5), (64, 32, 3.0)])
def test_cmmd_matches_the_published_formula(n_real, n_fake, shift, monkeypatch):
    real, fake = _features(6, n_real, dim=32), _features(7, n_fake, dim=32, shift=shift)
    expected = published_cmmd(real, fake)
    assert cmmd(real, fake) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    monkeypatch.setattr(cmmd_module, "BLOCK_ELEMENTS", 500)
    assert cmmd(real, fake) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_cmmd_is_zero_for_one_set_and_grows_with_the_shift():
    real = _features(8, 50, dim=8)
    assert cmmd(real, real) == 0.0
    values = [cmmd(real, _features(9, 50, dim=8, shift=s)) for s in (0.0, 1.0, 3.0)]
    assert values == sorted(values) and values[-1] > 0


@pytest.mark.parametrize("call, message", [
    (lambda: prdc(_features(0, 10), _features(1, 10, dim=8)), "differ in width"),
    (lambda: prdc(_features(0, 10), _features(1, 10), nearest_k=10), r"nearest_k must be in \[1, 9\]"),
    (lambda: prdc(np.zeros(10), _features(1, 10)), r"\[N, D\] array"),
    (lambda: cmmd(_features(0, 10), _features(1, 10, dim=8)), "one width"),
])
def test_bad_feature_arrays_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()
