"""Numbers with their uncertainty: the one place probe defines its intervals and tests.

Every comparison probe states (a method beats random pixel orders, a synthetic image out-activates
the best dataset image, predictions survive a shift, a trained net differs from its random
initialisation, seeds of one config agree) is one of these records, so the metrics files, the
report and the README all say the same thing the same way.

- :func:`mean_interval`: Student's t interval of a mean (the textbook interval for a sample mean;
  with n = 1 it is undefined and the bounds are NaN).
- :func:`proportion_interval`: Wilson's score interval (Wilson 1927; recommended over the Wald
  interval by Brown, Cai & DasGupta 2001, "Interval estimation for a binomial proportion").
- :func:`paired_comparison`: the mean of paired differences with its t interval and a two-sided
  sign-flip permutation p-value (Fisher 1935; exact over all 2^n sign patterns when n <= 16, else
  Monte Carlo with the (1 + hits) / (1 + draws) estimator of Phipson & Smyth 2010).
- :func:`proportions_comparison`: a difference of two proportions with Newcombe's hybrid score
  interval (Newcombe 1998, method 10) and Fisher's exact test.
- :func:`se_interval`, :func:`se_difference`: an estimate known by its standard error (CKA's delta-method
  SE over minibatches) with a Student t interval on ``df`` degrees of freedom, and the difference of two
  such estimates with their SEs combined as if independent (``sqrt(se_a^2 + se_b^2)``, Welch-Satterthwaite
  degrees of freedom) and a two-sided t test: conservative when the two are positively correlated, as
  estimates from the same images usually are.
- :func:`holm`: Holm's step-down adjustment for a family of tests (Holm 1979).

Intervals are 95% unless ``level`` says otherwise. A comparison is *distinguishable* when its
(Holm-adjusted, if set) p-value is below ``alpha`` **and** its interval excludes 0: at small n the t
interval and the permutation test can disagree (six pairs all of one sign give p = 2/64 while the t
interval still covers 0), and probe states only what both support. Otherwise the report says "not
distinguishable".
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, replace
from typing import Optional, Sequence

import numpy as np
from scipy import stats

EXACT_SIGN_FLIPS = 16  # up to this many pairs the permutation test enumerates every sign pattern
LEVEL = 0.95
ALPHA = 0.05


@dataclass(frozen=True)
class Estimate:
    """A number with its interval: ``value`` in [``low``, ``high``] at ``level``, from ``n`` observations."""

    value: float
    low: float
    high: float
    n: int
    method: str  # "t", "wilson"
    level: float = LEVEL

    def to_dict(self) -> dict:
        return _finite_dict(asdict(self))


@dataclass(frozen=True)
class Comparison:
    """An effect (a difference) with its interval and a two-sided p-value.

    ``p_adjusted`` is set when the comparison belongs to a family (see :func:`holm`)."""

    effect: float
    low: float
    high: float
    p: float
    n: int
    test: str  # "sign-flip permutation", "fisher exact"
    level: float = LEVEL
    p_adjusted: Optional[float] = None

    def distinguishable(self, alpha: float = ALPHA) -> bool:
        p = self.p if self.p_adjusted is None else self.p_adjusted
        covers_zero = np.isfinite(self.low) and np.isfinite(self.high) and self.low <= 0 <= self.high
        return bool(np.isfinite(p) and p < alpha and not covers_zero)

    def to_dict(self) -> dict:
        return {**_finite_dict(asdict(self)), "distinguishable": self.distinguishable()}

    @classmethod
    def from_dict(cls, d: dict) -> "Comparison":
        """The inverse of :meth:`to_dict` (null bounds or p read as NaN)."""
        nan = lambda v: math.nan if v is None else float(v)  # noqa: E731
        return cls(nan(d.get("effect")), nan(d.get("low")), nan(d.get("high")), nan(d.get("p")), int(d.get("n") or 0),
                   str(d.get("test", "")), float(d.get("level", LEVEL)),
                   None if d.get("p_adjusted") is None else float(d["p_adjusted"]))


def _finite_dict(d: dict) -> dict:
    """NaN and inf become None, so JSON files hold only numbers and nulls."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _values(x: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    v = np.asarray(x, dtype=np.float64).ravel()
    if not np.isfinite(v).all():
        raise ValueError(f"{what}: values must be finite (got {int((~np.isfinite(v)).sum())} NaN/inf)")
    return v


def mean_interval(x: Sequence[float] | np.ndarray, level: float = LEVEL) -> Estimate:
    """The mean of ``x`` with Student's t interval (bounds NaN with fewer than two values; a zero-width
    interval when every value is equal)."""
    v = _values(x, "mean_interval")
    n = len(v)
    if n == 0:
        raise ValueError("mean_interval: no values")
    m = float(v.mean())
    if n < 2:
        return Estimate(m, math.nan, math.nan, n, "t", level)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return Estimate(m, m - half, m + half, n, "t", level)


def proportion_interval(k: int, n: int, level: float = LEVEL) -> Estimate:
    """``k`` successes out of ``n`` as a proportion with Wilson's score interval."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"proportion_interval: need 0 <= k <= n and n >= 1 (got k={k}, n={n})")
    lo, hi = _wilson(k, n, level)
    return Estimate(k / n, lo, hi, n, "wilson", level)


def _wilson(k: int, n: int, level: float) -> tuple[float, float]:
    z = float(stats.norm.ppf(0.5 + level / 2))
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    # the interval always holds p (at k = n the upper bound is 1 exactly, not 1 - 1e-16)
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def sign_flip_p(d: np.ndarray, resamples: int = 10_000, seed: int = 0) -> float:
    """Two-sided p-value of H0 "the paired differences ``d`` are symmetric about 0": the fraction of sign
    patterns whose |mean| is at least the observed one (exact up to :data:`EXACT_SIGN_FLIPS` pairs)."""
    d = _values(d, "sign_flip_p")
    n = len(d)
    if n == 0:
        raise ValueError("sign_flip_p: no differences")
    observed = abs(d.sum())
    tol = 1e-12 * max(1.0, float(np.abs(d).sum()))  # ties within rounding count as "at least"
    if n <= EXACT_SIGN_FLIPS:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        return float((np.abs(signs @ d) >= observed - tol).mean())
    rng = np.random.default_rng(seed)
    hits = 0
    for lo in range(0, resamples, 4096):
        signs = rng.choice((1.0, -1.0), size=(min(4096, resamples - lo), n))
        hits += int((np.abs(signs @ d) >= observed - tol).sum())
    return (1 + hits) / (1 + resamples)


def paired_comparison(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, level: float = LEVEL,
                      resamples: int = 10_000, seed: int = 0) -> Comparison:
    """``mean(a - b)`` over pairs, its t interval, and the sign-flip permutation p-value."""
    a, b = _values(a, "paired_comparison a"), _values(b, "paired_comparison b")
    if a.shape != b.shape:
        raise ValueError(f"paired_comparison: {len(a)} values against {len(b)}; pairs need equal lengths")
    d = a - b
    e = mean_interval(d, level)
    return Comparison(e.value, e.low, e.high, sign_flip_p(d, resamples, seed), len(d), "sign-flip permutation", level)


def proportions_comparison(k1: int, n1: int, k2: int, n2: int, level: float = LEVEL) -> Comparison:
    """``k1/n1 - k2/n2`` with Newcombe's hybrid score interval and Fisher's exact two-sided p-value."""
    p1, p2 = proportion_interval(k1, n1, level), proportion_interval(k2, n2, level)
    d = p1.value - p2.value
    low = d - math.sqrt((p1.value - p1.low) ** 2 + (p2.high - p2.value) ** 2)
    high = d + math.sqrt((p1.high - p1.value) ** 2 + (p2.value - p2.low) ** 2)
    p = float(stats.fisher_exact([[k1, n1 - k1], [k2, n2 - k2]]).pvalue)
    return Comparison(d, low, high, min(1.0, p), n1 + n2, "fisher exact", level)


def se_interval(value: float, se: float, df: int, level: float = LEVEL) -> Estimate:
    """``value`` with the t interval ``value +- t_df * se`` (NaN bounds when ``df < 1`` or ``se`` is not finite);
    ``n`` records ``df + 1``, the independent pieces the SE came from."""
    if df < 1 or not math.isfinite(se):
        return Estimate(value, math.nan, math.nan, df + 1, "t (standard error)", level)
    half = float(stats.t.ppf(0.5 + level / 2, df)) * se
    return Estimate(value, value - half, value + half, df + 1, "t (standard error)", level)


def se_difference(a: float, se_a: float, b: float, se_b: float, df_a: int, df_b: int,
                  level: float = LEVEL) -> Comparison:
    """``a - b`` from two estimates with standard errors on ``df_a``, ``df_b`` degrees of freedom: the SEs
    combined as if independent, Welch-Satterthwaite degrees of freedom, a two-sided t test."""
    d = a - b
    var = se_a ** 2 + se_b ** 2
    if df_a < 1 or df_b < 1 or not math.isfinite(var):
        return Comparison(d, math.nan, math.nan, math.nan, df_a + df_b + 2, "t (standard errors)", level)
    if var == 0:
        p = 1.0 if d == 0 else 0.0
        return Comparison(d, d, d, p, df_a + df_b + 2, "t (standard errors)", level)
    df = var ** 2 / (se_a ** 4 / df_a + se_b ** 4 / df_b)
    half = float(stats.t.ppf(0.5 + level / 2, df)) * math.sqrt(var)
    p = float(2 * stats.t.sf(abs(d) / math.sqrt(var), df))
    return Comparison(d, d - half, d + half, p, df_a + df_b + 2, "t (standard errors)", level)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given (NaN stays NaN and is not counted)."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(len(p), np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    running = 0.0
    for rank, i in enumerate(ok[np.argsort(p[ok], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def adjust(comparisons: Sequence[Comparison]) -> list[Comparison]:
    """The same comparisons with Holm-adjusted p-values over the whole family."""
    return [replace(c, p_adjusted=q) for c, q in zip(comparisons, holm([c.p for c in comparisons]))]
