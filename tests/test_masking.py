import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from mage_bench.errors import ConfigError
from mage_bench.mage.masking import (
    MASKINGS,
    batch_ratios,
    check_mask_ratio_min,
    create_masking,
    num_dropped,
    realised_mean,
    resolve_masking,
    sample_token_masks,
)

SPECS = ["truncnorm", "truncnorm:mean=0.7,std=0.1,min=0.5,max=1.0", "uniform", "uniform:low=0.3,high=0.9",
         "fixed", "fixed:ratio=0.5", "cosine", "cosine:min=0.5,max=1.0", "beta", "beta:a=3,b=2,min=0.5,max=1.0"]


def _draws(spec, n=20_000, seed=0):
    return create_masking(spec).sample(n, torch.Generator().manual_seed(seed)).double()


def test_official_truncnorm_moments():
    x = _draws("truncnorm:mean=0.55,std=0.25,min=0.5,max=1.0")
    assert abs(float(x.mean()) - 0.694) < 0.005
    assert abs(float(x.std()) - 0.129) < 0.005
    assert create_masking("truncnorm") == create_masking("truncnorm:mean=0.55,std=0.25,min=0.5,max=1.0")


def test_every_registered_distribution_is_covered():
    assert {s.partition(":")[0] for s in SPECS} == set(MASKINGS.names())


@pytest.mark.parametrize("spec", SPECS)
def test_samples_lie_in_support_and_match_the_mean(spec):
    dist = create_masking(spec)
    x = _draws(spec)
    lo, hi = dist.support()
    assert float(x.min()) >= lo - 1e-6 and float(x.max()) <= hi + 1e-6
    assert abs(float(x.mean()) - dist.mean()) < 0.005


@pytest.mark.parametrize("spec", [s for s in SPECS if not s.startswith("fixed")])
def test_pdf_is_a_density(spec):
    dist = create_masking(spec)
    lo, hi = dist.support()
    total, _ = quad(lambda v: float(dist.pdf(np.array([v]))[0]), lo, hi, limit=200)
    assert abs(total - 1.0) < 1e-3
    assert float(dist.pdf(np.array([hi + 0.01]))[0]) == 0.0 or hi >= 1.0


@pytest.mark.parametrize("spec", SPECS)
def test_spec_round_trips(spec):
    dist = create_masking(spec)
    again = create_masking(dist.spec())
    assert again.spec() == dist.spec() and again.params == dist.params


def test_draws_follow_the_generator():
    assert torch.equal(_draws("beta", 100, seed=3), _draws("beta", 100, seed=3))
    assert not torch.equal(_draws("beta", 100, seed=3), _draws("beta", 100, seed=4))


def test_cosine_is_maskgits_schedule():
    assert abs(create_masking("cosine").mean() - 2 / math.pi) < 1e-12
    x = _draws("cosine", 50_000)
    # P(ratio <= m) = 1 - (2/pi) arccos(m)
    for m in (0.3, 0.7, 0.95):
        assert abs(float((x <= m).double().mean()) - (1 - 2 / math.pi * math.acos(m))) < 0.01


@pytest.mark.parametrize("spec, message", [
    ("trunc", r"did you mean 'truncnorm'"),
    ("uniform:lo=0.5", r"unknown parameter 'lo' for uniform \(did you mean 'low'\?\)"),
    ("uniform:low=half", r"low='half' is not a number"),
    ("uniform:low", r"expected key=value"),
    ("uniform:low=0.9,high=0.5", r"needs low < high"),
    ("truncnorm:std=0", r"needs std > 0"),
    ("fixed:ratio=1.5", r"ratios must lie in \[0, 1\]"),
    ("beta:a=-1", r"needs a > 0"),
])
def test_bad_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        create_masking(spec)


def test_mask_ratio_min_must_not_exceed_the_support():
    check_mask_ratio_min(create_masking("uniform:low=0.5,high=1.0"), 0.5)
    with pytest.raises(ConfigError, match="can draw ratios down to 0.0, below masking.mask_ratio_min=0.5"):
        check_mask_ratio_min(create_masking("cosine"), 0.5)
    with pytest.raises(ConfigError, match=r"must be in \[0, 1\)"):
        check_mask_ratio_min(create_masking("fixed:ratio=1.0"), 1.0)


@pytest.mark.parametrize("L, ratio, minimum", [(256, 0.694, 0.5), (64, 0.5, 0.5), (64, 1.0, 0.5), (64, 0.75, 0.75),
                                                (64, 0.3, 0.0)])
def test_token_masks(L, ratio, minimum):
    mask, drop = sample_token_masks(torch.full((8,), ratio), L, minimum, torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == drop.shape == (8, L)
    assert not (drop & ~mask).any()  # dropped ⊂ masked
    assert (drop.sum(1) == num_dropped(L, minimum)).all()  # a fixed encoder length
    assert (mask.sum(1) == math.ceil(L * ratio - 1e-9)).all()
    assert num_dropped(256, 0.5) == 128  # the official 128 dropped of 256


def test_ratios_per_batch_process_and_sample():
    dist = create_masking("uniform")
    shared = batch_ratios(dist, 16, "batch", 2, torch.Generator().manual_seed(0))
    assert shared.shape == (32,) and (shared == shared[0]).all()
    # per process (official): rank r's 16 rows share one ratio, and the two ranks' ratios differ
    per_rank = batch_ratios(dist, 16, "process", 2, torch.Generator().manual_seed(0))
    assert (per_rank[:16] == per_rank[0]).all() and (per_rank[16:] == per_rank[16]).all()
    assert per_rank[0] != per_rank[16]
    # with one process, "process" and "batch" make the same draw from the same generator state
    one = batch_ratios(dist, 16, "process", 1, torch.Generator().manual_seed(0))
    assert torch.equal(one, batch_ratios(dist, 16, "batch", 1, torch.Generator().manual_seed(0)))
    g = torch.Generator().manual_seed(0)
    own = batch_ratios(dist, 16, "sample", 1, g)
    assert len(set(own.tolist())) == 16
    mask, drop = sample_token_masks(own, 64, 0.5, g)
    assert len(set(mask.sum(1).tolist())) > 1 and len(set(drop.sum(1).tolist())) == 1


def test_clamp_to_drop_and_realised_mean():
    official = create_masking("truncnorm:mean=0.55,std=0.25,min=0.5,max=1.0")
    with pytest.raises(ConfigError, match="clamp_to_drop"):
        resolve_masking(official.spec(), 0.75)
    assert resolve_masking(official.spec(), 0.75, clamp_to_drop=True)[1] == 0.75
    assert realised_mean(official) == pytest.approx(official.mean(), abs=1e-5)  # ~0.694, as REFERENCE.md
    assert realised_mean(official, 0.5) == pytest.approx(official.mean(), abs=1e-5)  # no draw below 0.5
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64).numpy()
    monte_carlo = float(np.maximum(np.clip(official.ppf(u), 0.5, 1.0), 0.75).mean())
    assert realised_mean(official, 0.75) == pytest.approx(monte_carlo, abs=2e-3)
    assert realised_mean(create_masking("fixed:ratio=0.75"), 0.5) == pytest.approx(0.75)
