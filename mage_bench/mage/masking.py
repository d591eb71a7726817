"""Masking-ratio distributions (the axis mage-bench sweeps) and the token masks they produce.

A distribution is an object passed to training, never built inside the model. Every draw takes an
explicit `torch.Generator`: `sample(n, generator)` turns uniform draws into ratios through the
distribution's inverse CDF, so a seed fixes the ratios on every machine.

Spec strings: `NAME:key=value,...` (e.g. `truncnorm:mean=0.55,std=0.25,min=0.5,max=1.0`); `spec()`
writes every parameter back, so `create_masking(d.spec())` rebuilds `d` exactly.

Official MAGE: one ratio per iteration, shared by the batch, from scipy's truncnorm with mean 0.55,
std 0.25 on [0.5, 1.0]; `ceil(L * mask_ratio_min)` tokens are dropped and `ceil(L * ratio)` masked.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import torch

from mage_bench.errors import ConfigError
from mage_bench.registry import Registry, did_you_mean

MASKINGS: Registry[type[MaskingDistribution]] = Registry("masking distribution")


class MaskingDistribution(ABC):
    """A distribution of masking ratios on a sub-interval of (0, 1]."""

    name: ClassVar[str]
    defaults: ClassVar[dict[str, float]]

    def __init__(self, **params: float) -> None:
        self.params = {**self.defaults, **params}
        self.validate()

    # -- what each distribution defines
    @abstractmethod
    def ppf(self, u: np.ndarray) -> np.ndarray:
        """Inverse CDF on u in [0, 1)."""

    @abstractmethod
    def mean(self) -> float:
        """The exact mean ratio."""

    @abstractmethod
    def pdf(self, x: np.ndarray) -> np.ndarray:
        """Density at x (0 outside the support); for plots."""

    @abstractmethod
    def support(self) -> tuple[float, float]:
        """(lowest, highest) ratio that can be drawn."""

    def validate(self) -> None:
        lo, hi = self.support()
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(f"masking {self.spec()}: ratios must lie in [0, 1], got [{lo}, {hi}]")

    # -- shared behaviour
    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n ratios, float32[n], reproducible from `generator`."""
        u = torch.rand(n, generator=generator, dtype=torch.float64).numpy()
        ratios = np.clip(self.ppf(u), *self.support())
        return torch.from_numpy(ratios.astype(np.float32))

    def spec(self) -> str:
        return self.name + ":" + ",".join(f"{k}={float(v)!r}" for k, v in self.params.items())

    def __repr__(self) -> str:
        return f"MaskingDistribution({self.spec()})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MaskingDistribution) and other.spec() == self.spec()

    def __hash__(self) -> int:
        return hash(self.spec())


def _register(cls: type[MaskingDistribution]) -> type[MaskingDistribution]:
    return MASKINGS.register(cls.name)(cls)


class _ScipyOnInterval(MaskingDistribution):
    """A scipy.stats distribution frozen on [min, max]: ppf, mean and pdf come from scipy."""

    @abstractmethod
    def _frozen(self):
        """The frozen scipy.stats distribution."""

    def _scipy(self):
        """`_frozen()`, built once per object: freezing costs ~1.5 ms, a twentieth of a tiny training step,
        and training draws every step (the parameters never change after `__init__`)."""
        if "_scipy_frozen" not in self.__dict__:
            self.__dict__["_scipy_frozen"] = self._frozen()
        return self.__dict__["_scipy_frozen"]

    def ppf(self, u):
        return self._scipy().ppf(u)

    def mean(self):
        return float(self._scipy().mean())

    def pdf(self, x):
        return self._scipy().pdf(x)

    def support(self):
        return self.params["min"], self.params["max"]


@_register
class TruncatedNormal(_ScipyOnInterval):
    """The official MAGE distribution: N(mean, std) truncated to [min, max]."""

    name = "truncnorm"
    defaults = {"mean": 0.55, "std": 0.25, "min": 0.5, "max": 1.0}

    def _frozen(self):
        from scipy.stats import truncnorm

        p = self.params
        return truncnorm((p["min"] - p["mean"]) / p["std"], (p["max"] - p["mean"]) / p["std"],
                         loc=p["mean"], scale=p["std"])

    def validate(self) -> None:
        if self.params["std"] <= 0 or self.params["min"] >= self.params["max"]:
            raise ConfigError(f"masking {self.spec()}: needs std > 0 and min < max")
        super().validate()



@_register
class Uniform(MaskingDistribution):
    name = "uniform"
    defaults = {"low": 0.5, "high": 1.0}

    def validate(self) -> None:
        if self.params["low"] >= self.params["high"]:
            raise ConfigError(f"masking {self.spec()}: needs low < high")
        super().validate()

    def ppf(self, u):
        return self.params["low"] + u * (self.params["high"] - self.params["low"])

    def mean(self):
        return 0.5 * (self.params["low"] + self.params["high"])

    def pdf(self, x):
        lo, hi = self.support()
        return np.where((x >= lo) & (x <= hi), 1.0 / (hi - lo), 0.0)

    def support(self):
        return self.params["low"], self.params["high"]


@_register
class Fixed(MaskingDistribution):
    """One ratio every time (MAE-like at 0.75). Its density is a point mass: `pdf` is inf there."""

    name = "fixed"
    defaults = {"ratio": 0.75}

    def ppf(self, u):
        return np.full_like(u, self.params["ratio"])

    def mean(self):
        return self.params["ratio"]

    def pdf(self, x):
        return np.where(np.isclose(x, self.params["ratio"]), np.inf, 0.0)

    def support(self):
        return self.params["ratio"], self.params["ratio"]


@_register
class Cosine(MaskingDistribution):
    """MaskGIT's schedule as a distribution: ratio = cos(pi/2 * r), r uniform, restricted to [min, max].

    r is drawn uniformly on the interval that maps onto [min, max], so with the defaults (0, 1)
    this is exactly MaskGIT's training distribution: density (2/pi) / sqrt(1 - m^2), mean 2/pi.
    """

    name = "cosine"
    defaults = {"min": 0.0, "max": 1.0}

    def _r_range(self) -> tuple[float, float]:
        return 2 / math.pi * math.acos(self.params["max"]), 2 / math.pi * math.acos(self.params["min"])

    def validate(self) -> None:
        if self.params["min"] >= self.params["max"]:
            raise ConfigError(f"masking {self.spec()}: needs min < max")
        super().validate()

    def ppf(self, u):
        r0, r1 = self._r_range()
        return np.cos(np.pi / 2 * (r0 + u * (r1 - r0)))

    def mean(self):
        r0, r1 = self._r_range()  # E[cos(pi r / 2)] for r ~ U(r0, r1)
        return (2 / math.pi) * (math.sin(math.pi / 2 * r1) - math.sin(math.pi / 2 * r0)) / (r1 - r0)

    def pdf(self, x):
        r0, r1 = self._r_range()
        lo, hi = self.support()
        inside = (x >= lo) & (x < hi) & (x < 1.0)
        dens = (2 / np.pi) / np.sqrt(1.0 - np.clip(x, 0.0, 1.0 - 1e-12) ** 2) / (r1 - r0)
        return np.where(inside, dens, 0.0)

    def support(self):
        return self.params["min"], self.params["max"]


@_register
class Beta(_ScipyOnInterval):
    """Beta(a, b) rescaled onto [min, max]."""

    name = "beta"
    defaults = {"a": 2.0, "b": 1.0, "min": 0.0, "max": 1.0}

    def _frozen(self):
        from scipy.stats import beta

        p = self.params
        return beta(p["a"], p["b"], loc=p["min"], scale=p["max"] - p["min"])

    def validate(self) -> None:
        if self.params["a"] <= 0 or self.params["b"] <= 0 or self.params["min"] >= self.params["max"]:
            raise ConfigError(f"masking {self.spec()}: needs a > 0, b > 0 and min < max")
        super().validate()



def create_masking(spec: str) -> MaskingDistribution:
    """Parse `NAME[:key=value,...]` into a distribution; errors name the bad part and the fix."""
    name, _, rest = spec.strip().partition(":")
    try:
        cls = MASKINGS.get(name)
    except Exception as exc:
        raise ConfigError(f"masking spec {spec!r}: {exc}") from None
    params: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise ConfigError(f"masking spec {spec!r}: expected key=value, got {item!r}")
        if key not in cls.defaults:
            raise ConfigError(f"masking spec {spec!r}: unknown parameter {key!r} for {name}"
                              f"{did_you_mean(key, list(cls.defaults))}; parameters: {', '.join(cls.defaults)}")
        try:
            params[key] = float(value)
        except ValueError:
            raise ConfigError(f"masking spec {spec!r}: {key}={value!r} is not a number") from None
    return cls(**params)


# --------------------------------------------------------------------------------------------
# From ratios to token masks


def num_dropped(seq_len: int, mask_ratio_min: float) -> int:
    """How many tokens every row drops from the encoder: ceil(L * mask_ratio_min), as officially."""
    return int(math.ceil(seq_len * mask_ratio_min - 1e-9))


def check_mask_ratio_min(distribution: MaskingDistribution, mask_ratio_min: float,
                         clamp_to_drop: bool = False) -> None:
    """Dropped tokens must be a subset of masked ones, so no ratio may fall below mask_ratio_min
    (unless `clamp_to_drop` raises such draws to it)."""
    lo, _ = distribution.support()
    if not 0.0 <= mask_ratio_min < 1.0:
        raise ConfigError(f"masking.mask_ratio_min={mask_ratio_min} must be in [0, 1)")
    if mask_ratio_min > lo + 1e-9 and not clamp_to_drop:
        raise ConfigError(f"masking {distribution.spec()} can draw ratios down to {lo}, below "
                          f"masking.mask_ratio_min={mask_ratio_min} (the share always dropped); "
                          f"set mask_ratio_min <= {lo}, raise the distribution's lower bound, or set "
                          "masking.clamp_to_drop: true to raise such draws to the drop share")


def resolve_masking(spec: str, mask_ratio_min: float | None,
                    clamp_to_drop: bool = False) -> tuple[MaskingDistribution, float]:
    """The distribution and the share always dropped (None: the distribution's lower bound, as
    officially), checked against each other."""
    distribution = create_masking(spec)
    if mask_ratio_min is None:
        mask_ratio_min = distribution.support()[0]
    check_mask_ratio_min(distribution, mask_ratio_min, clamp_to_drop)
    return distribution, mask_ratio_min


def realised_mean(distribution: MaskingDistribution, floor: float = 0.0, grid: int = 200_000) -> float:
    """The mean ratio training actually uses when draws below `floor` are raised to it (clamp_to_drop),
    by the midpoint rule on the inverse CDF: deterministic, exact to ~1e-6 for these distributions."""
    u = (np.arange(grid, dtype=np.float64) + 0.5) / grid
    ratios = np.clip(distribution.ppf(u), *distribution.support())
    return float(np.maximum(ratios, floor).mean())


def masks_from_keys(keys: torch.Tensor, n_mask: torch.Tensor, n_drop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [B, L] (distinct within a row) order each row's positions; the `n_drop` lowest are dropped and
    the `n_mask[b]` lowest masked. One argsort and a scatter (no second argsort for the ranks): position p
    is among the lowest n exactly when its rank is below n."""
    order = keys.argsort(dim=1)  # [B, L], positions from the lowest key up
    slots = torch.arange(keys.shape[1], device=keys.device)
    mask = torch.empty(keys.shape, dtype=torch.bool, device=keys.device)
    drop = torch.empty_like(mask)
    mask.scatter_(1, order, (slots < n_mask[:, None]).expand_as(order))
    drop.scatter_(1, order, (slots < n_drop).expand_as(order))
    return mask, drop


def _mask_counts(ratios: torch.Tensor, seq_len: int, n_drop: int) -> torch.Tensor:
    """ceil(L * ratio) masked tokens per row (at least the dropped ones and one), long[B]."""
    return torch.ceil(ratios.double() * seq_len - 1e-9).long().clamp(min=max(n_drop, 1), max=seq_len)


def sample_token_masks(ratios: torch.Tensor, seq_len: int, mask_ratio_min: float,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row random token order; the lowest-ranked are dropped, a longer prefix is masked.

    ratios: float[B] (one per row; repeat one value for the official per-batch draw).
    Returns (mask bool[B, L], drop bool[B, L]) with drop ⊂ mask, every row dropping the same
    number ceil(L * mask_ratio_min) and masking ceil(L * ratio) (at least one) tokens.
    Training draws its masks with `rank_token_masks` instead (per process, on its device).
    """
    n_drop = num_dropped(seq_len, mask_ratio_min)
    noise = torch.rand(ratios.shape[0], seq_len, generator=generator)  # [B, L]; ties are impossible in practice
    return masks_from_keys(noise, _mask_counts(ratios, seq_len, n_drop), n_drop)


# A counter-based random order: each (seed, step, view, row, position) hashes to a 32-bit key through
# murmur3's finaliser (a bijection of 32-bit integers), computed with exact integer arithmetic. So a row's
# order depends on its global index only: a process draws just its own rows, on its own device (CPU
# and GPU give the same bits), and the masks do not change with the number of processes.
_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2^32 for 0 <= x < 2^32, in 16-bit halves so no int64 product overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def hashed_keys(seed: int, step: int, view: int, rows: torch.Tensor, seq_len: int) -> torch.Tensor:
    """int64 [len(rows), seq_len] keys in [0, 2^32), distinct within a row, a pure function of the arguments
    and the global row indices `rows` (long, on the device the keys are wanted on)."""
    key = rows.long() & _M32
    for part in (view, step, seed >> 32, seed):  # each part folded in through the bijection
        key = _mix32(key ^ (part & _M32))
    positions = _mix32(torch.arange(seq_len, device=rows.device, dtype=torch.long) + 0x9E3779B9 & _M32)
    return _mix32(key[:, None] ^ positions[None, :])  # distinct positions stay distinct


def rank_token_masks(ratios: torch.Tensor, seq_len: int, mask_ratio_min: float, *, seed: int, step: int,
                     view: int, first_row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample_token_masks` for one process's rows of a global batch, drawn on `ratios.device`.

    ratios: float[B] of this process's rows, whose global indices are first_row .. first_row + B - 1.
    The order of row r at `step` (and MAGE-C `view`) is the same whatever the number of processes, and
    drawing costs B rows, not the global batch: no host work, no transfer, no host sync.
    """
    n_drop = num_dropped(seq_len, mask_ratio_min)
    rows = torch.arange(first_row, first_row + ratios.shape[0], device=ratios.device)
    keys = hashed_keys(seed, step, view, rows, seq_len)
    return masks_from_keys(keys, _mask_counts(ratios, seq_len, n_drop), n_drop)


def batch_ratios(distribution: MaskingDistribution, batch_size: int, per: str, world: int,
                 generator: torch.Generator) -> torch.Tensor:
    """float[world * batch_size], the ratios of one global batch (rank r owns rows r*B..(r+1)*B-1).

    per="batch": one draw for the whole global batch; "process": one draw per process, shared by its
    rows (official MAGE); "sample": one per image. Every process holds `generator` in the same state and
    draws the whole global batch's ratios, so the ranks stay in step; with world 1, "process" and
    "batch" make the same single draw.
    """
    if per == "sample":
        return distribution.sample(world * batch_size, generator)
    draws = distribution.sample(world if per == "process" else 1, generator)  # [world] or [1]
    return draws.repeat_interleave(batch_size) if per == "process" else draws.expand(world * batch_size).clone()
