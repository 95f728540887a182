"""Quantiles for error bounds that hold for every channel of a layer at once. Pure Python.

A layer's bound B covers 2C estimates (a mean and a variance per channel) at once: it is the largest of
their errors that stays below B with 95% confidence, P(all |e_k| <= B) = prod_k P(|e_k| <= B) = 0.95 for
independent errors e_k of standard deviations s_k, solved for B. An estimate whose s_k is far below the
largest hardly counts, so the bound is tighter than a quantile shared out evenly (Sidak's) and holds about
95% of the time. The standard errors come from B batches, so each s_k is widened by the ratio of Student's t
with B - 1 degrees of freedom to the normal quantile: with few batches the bound widens instead of lying.
"""

from __future__ import annotations

import math
from functools import lru_cache
from statistics import NormalDist

CONFIDENCE = 0.95
_EXACT_UP_TO = 100  # degrees of freedom; above, the Cornish-Fisher expansion is within 1e-4 of it


def two_sided_t_cdf(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with an integer number of degrees of freedom (the finite series in
    theta = atan(t / sqrt(df)), Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    cos2, term, total = math.cos(theta) ** 2, 1.0, 1.0
    if df % 2 == 0:
        for k in range(1, df // 2):
            term *= cos2 * (2 * k - 1) / (2 * k)
            total += term
        return math.sin(theta) * total
    if df == 1:
        return 2 * theta / math.pi
    for k in range(1, (df - 1) // 2):
        term *= cos2 * (2 * k) / (2 * k + 1)
        total += term
    return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)


def _t_density(t: float, df: int) -> float:
    log = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log - (df + 1) / 2 * math.log1p(t * t / df))


@lru_cache(maxsize=4096)
def two_sided_t_quantile(coverage: float, df: int) -> float:
    """The t with P(|T| < t) = ``coverage`` for ``df`` degrees of freedom (``df`` >= 1)."""
    z = NormalDist().inv_cdf((1 + coverage) / 2)
    if df > _EXACT_UP_TO:
        return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
    low, high = 0.0, max(2 * z, 1.0)
    while two_sided_t_cdf(high, df) < coverage:
        low, high = high, 2 * high
    t = (low + high) / 2
    for _ in range(100):  # Newton, kept inside the bracket by bisection when it steps out
        gap = two_sided_t_cdf(t, df) - coverage
        if abs(gap) < 1e-12:
            break
        low, high = (low, t) if gap > 0 else (t, high)
        step = t - gap / (2 * _t_density(t, df))
        t = step if low < step < high else (low + high) / 2
    return t


def sidak_quantile(estimates: int, confidence: float = CONFIDENCE) -> float:
    """The normal quantile that bounds ``estimates`` errors of one standard deviation each at once."""
    return NormalDist().inv_cdf((1 + confidence ** (1 / estimates)) / 2)


def t_widening(estimates: int, batches: int, confidence: float = CONFIDENCE) -> float:
    """How much wider Student's t with ``batches`` - 1 degrees of freedom is than the normal at the tail the
    bound of ``estimates`` errors reaches; infinite below two batches (no spread to measure)."""
    if batches < 2:
        return math.inf
    level = confidence ** (1 / estimates)
    return two_sided_t_quantile(level, batches - 1) / sidak_quantile(estimates, confidence)
