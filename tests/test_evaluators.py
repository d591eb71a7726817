import numpy as np
import pytest
import torch

from mage_bench.errors import UserError
from mage_bench.eval.fewshot import few_shot
from mage_bench.eval.fid import feature_statistics, frechet_distance
from mage_bench.eval.knn import knn_classify, retrieval_metrics
from mage_bench.eval.linear import _lars_step, linear_probe, linear_probe_mae


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    return train_test_split(bunch.data / 16.0, bunch.target, test_size=0.2, stratify=bunch.target, random_state=0)


def test_frechet_matches_the_closed_form_for_gaussians():
    rng = np.random.default_rng(0)
    m1, m2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 0.0, -1.0])
    v1, v2 = np.array([1.0, 2.0, 0.5]), np.array([2.0, 1.0, 0.5])
    a = m1 + rng.standard_normal((200_000, 3)) * np.sqrt(v1)
    b = m2 + rng.standard_normal((200_000, 3)) * np.sqrt(v2)
    closed = float(((m1 - m2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum())  # diagonal covariances
    assert frechet_distance(a, b) == pytest.approx(closed, abs=0.02)


def test_frechet_agrees_with_torch_fidelity():
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    rng = np.random.default_rng(1)
    a = rng.standard_normal((500, 16)) @ rng.standard_normal((16, 16))
    b = rng.standard_normal((400, 16)) * 1.5 + 0.3
    ours = frechet_distance(a, b)
    theirs = fid_statistics_to_metric(fid_features_to_statistics(torch.from_numpy(a)),
                                      fid_features_to_statistics(torch.from_numpy(b)), verbose=False)[KEY_METRIC_FID]
    assert ours == pytest.approx(theirs, rel=1e-6)
    mu, sigma = feature_statistics(a)
    assert np.allclose(sigma, np.cov(a, rowvar=False)) and np.allclose(mu, a.mean(0))


def test_frechet_is_stable_when_rank_deficient():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((20, 64)), rng.standard_normal((30, 64))  # N < D: singular covariances
    value = frechet_distance(a, b)
    assert np.isfinite(value) and value >= -1e-6
    assert abs(frechet_distance(a, a)) < 1e-6


@pytest.mark.parametrize("bad, message", [
    (np.array([[np.nan, 1.0], [0.0, 1.0]]), "contain NaN or inf"),
    (np.zeros(5), "must be a 2-D array"),
    (np.zeros((1, 3)), "at least 2 feature rows"),
])
def test_frechet_bad_input(bad, message):
    with pytest.raises(UserError, match=message):
        frechet_distance(bad, np.zeros((4, bad.shape[-1] if bad.ndim else 1)))


def _brute_force_knn(train_x, train_y, test_x, k, temperature):
    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    sims = unit(test_x) @ unit(train_x).T
    top1 = []
    for row in sims:
        nearest = np.argsort(-row, kind="stable")[:k]
        votes = np.zeros(int(train_y.max()) + 1)
        for j in nearest:
            votes[train_y[j]] += np.exp(row[j] / temperature)
        top1.append(int(np.argmax(votes)))
    return np.array(top1)


@pytest.mark.parametrize("k", [1, 10, 20, 200])
def test_knn_matches_a_brute_force_weighted_vote(digits, k):
    train_x, test_x, train_y, test_y = digits
    result = knn_classify(train_x, train_y, test_x, test_y, k=k)
    expected = (_brute_force_knn(train_x, train_y, test_x, k, 0.07) == test_y).mean()
    assert result["top1"] == pytest.approx(expected, abs=1.5 / len(test_y))  # at most one float near-tie
    assert result["top5"] >= result["top1"]


def test_knn_few_queries_absent_classes_and_large_k(digits):
    train_x, test_x, train_y, test_y = digits
    keep = test_y < 3  # classes 3..9 absent from the queries
    result = knn_classify(train_x, train_y, test_x[keep][:40], test_y[keep][:40], k=5000)
    assert result["k"] == len(train_x) and 0.0 <= result["top1"] <= 1.0


def test_linear_probe_on_raw_pixels_matches_scikit_learn(digits):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train_x, test_x, train_y, test_y = digits
    result = linear_probe(train_x, train_y, test_x, test_y)
    assert result["top1"] >= 0.95 and result["top5"] >= result["top1"]
    scaler = StandardScaler().fit(train_x)
    reference = LogisticRegression(C=result["C"], max_iter=2000, random_state=0).fit(scaler.transform(train_x), train_y)
    assert result["top1"] == pytest.approx(reference.score(scaler.transform(test_x), test_y))


def test_few_shot_is_reproducible_by_seed(digits):
    train_x, test_x, train_y, test_y = digits
    a = few_shot(train_x, train_y, test_x, test_y, shots=(1, 5), draws=3, seed=0)
    b = few_shot(train_x, train_y, test_x, test_y, shots=(1, 5), draws=3, seed=0)
    c = few_shot(train_x, train_y, test_x, test_y, shots=(1, 5), draws=3, seed=1)
    assert a == b and a[1]["accuracies"] != c[1]["accuracies"]
    assert a[5]["mean"] > a[1]["mean"] and a[5]["ci_low"] <= a[5]["mean"] <= a[5]["ci_high"]
    with pytest.raises(UserError, match="fewer than 500 shots"):
        few_shot(train_x, train_y, test_x, test_y, shots=(500,), draws=2)


def _brute_force_map_at_r(db_x, db_y, q_x, q_y):
    """mAP@R straight from the definition, one query at a time (ties: lower database index first)."""
    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    sims = unit(q_x) @ unit(db_x).T
    aps = []
    for row, label in zip(sims, q_y, strict=True):
        r = int((db_y == label).sum())
        if r == 0:
            continue
        ranked = db_y[np.argsort(-row, kind="stable")[:r]] == label
        precision_at_i = np.cumsum(ranked) / np.arange(1, r + 1)
        aps.append((precision_at_i * ranked).sum() / r)
    return float(np.mean(aps)), len(aps)


def test_retrieval_map_at_r_matches_the_definition(digits):
    train_x, test_x, train_y, test_y = digits
    result = retrieval_metrics(train_x, train_y, test_x[:80], test_y[:80], precision_ks=(1, 10))
    expected, queries = _brute_force_map_at_r(train_x, train_y, test_x[:80], test_y[:80])
    assert result["queries"] == queries == 80
    assert result["map_at_r"] == pytest.approx(expected, abs=1e-3)  # float near-ties only
    assert 0.5 < result["map_at_r"] <= result["precision_at_1"] + 1e-9 <= 1.0


def test_retrieval_with_classes_missing_on_either_side(digits):
    train_x, test_x, train_y, test_y = digits
    db = train_y >= 2  # classes 0 and 1 absent from the database: those queries have nothing to retrieve
    q = test_y < 5  # classes 5..9 absent from the queries
    result = retrieval_metrics(train_x[db], train_y[db], test_x[q][:30], test_y[q][:30])
    expected, queries = _brute_force_map_at_r(train_x[db], train_y[db], test_x[q][:30], test_y[q][:30])
    assert result["queries"] == queries < 30
    assert result["map_at_r"] == pytest.approx(expected, abs=1e-3)


def test_mae_protocol_probe_learns_raw_pixels_and_is_seeded(digits):
    train_x, test_x, train_y, test_y = digits
    # Digits have 1,437 training images: ImageNet's 90 epochs of batch 4096 would be 90 steps, so the
    # test gives LARS (whose steps are ~lr * 1e-3 of the weight norm) the step count it needs.
    options = dict(epochs=90, batch_size=256, blr=10.0)
    result = linear_probe_mae(train_x, train_y, test_x, test_y, **options)
    assert result["top1"] >= 0.93 and result["lr"] == pytest.approx(10.0)
    assert linear_probe_mae(train_x, train_y, test_x, test_y, **options) == result


def test_lars_step_follows_the_trust_ratio():
    weight = torch.nn.Parameter(torch.full((2, 2), 2.0))  # norm 4
    bias = torch.nn.Parameter(torch.zeros(2))
    weight.grad, bias.grad = torch.full((2, 2), 0.5), torch.ones(2)  # update norm 1
    _lars_step([weight, bias], lr=1.0, momentum=0.9, weight_decay=0.0, trust=0.001, buffers={})
    assert torch.allclose(weight, torch.full((2, 2), 2.0 - 0.001 * 4 * 0.5))  # scaled by 0.001 * 4 / 1
    assert torch.allclose(bias, -torch.ones(2))  # vectors: plain momentum SGD step
