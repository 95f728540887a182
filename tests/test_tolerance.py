"""recalibrate(tolerance=...): error bounds from the spread between batches, and stopping on them."""

import math

import pytest
import torch

from bnguard.confidence import sidak_quantile, t_widening, two_sided_t_quantile
from bnguard.spread import BatchSpread
from bnguard.stats import pool_batches


def random_batches(count=50, channels=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    counts = torch.randint(10, 40, (count,), generator=generator).double()
    means = torch.randn(count, channels, generator=generator, dtype=torch.float64) * 0.3 + 1e4
    variances = torch.rand(count, channels, generator=generator, dtype=torch.float64) + 0.5
    return counts, means, variances


def direct_relative_errors(counts, means, variances):
    """The delta-method standard errors written out batch by batch, in float64, about the pooled mean."""
    pooled, _ = pool_batches(counts, means, variances)
    n, b = counts.sum(), len(counts)
    w = (counts / n)[:, None]
    q = ((counts - 1) / counts)[:, None] * variances + (means - pooled.mean).square()
    var_of_mean = b / (b - 1) * (w * (means - pooled.mean)).square().sum(dim=0)
    var_of_var = b / (b - 1) * (w * (q - pooled.m2 / n)).square().sum(dim=0)
    variance = pooled.variance()
    return var_of_mean.sqrt() / variance.sqrt(), var_of_var.sqrt() / variance


def test_spread_sums_give_the_direct_standard_errors_far_from_zero_and_in_pieces():
    counts, means, variances = random_batches()
    spread = BatchSpread.empty(3)
    for start, end in [(0, 7), (7, 30), (30, 50)]:
        spread = spread.add(counts[start:end], means[start:end], variances[start:end])
    torch.testing.assert_close(spread.relative_errors(0.0), direct_relative_errors(counts, means, variances),
                               rtol=1e-9, atol=0)
    assert spread.batches.tolist() == [50.0] * 3


def test_spreads_about_other_shifts_merge_exactly():
    counts, means, variances = random_batches()
    whole = BatchSpread.empty(3).add(counts, means, variances)
    halves = BatchSpread.empty(3).add(counts[:20], means[:20], variances[:20]).merge(
        BatchSpread.empty(3).add(counts[20:], means[20:], variances[20:]))  # shifted by another batch's mean
    assert torch.equal(halves.shift, whole.shift)
    torch.testing.assert_close(halves.first, whole.first, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(halves.relative_errors(0.0), whole.relative_errors(0.0), rtol=1e-9, atol=0)


def test_nonfinite_batches_are_left_out_of_the_spread_as_of_the_pooled_statistics():
    counts, means, variances = random_batches(count=12)
    poisoned_means = torch.cat([means[:1] * math.nan, means[:5], means[5:6] * math.inf, means[5:]])
    poisoned_vars = torch.cat([variances[:1], variances[:5], variances[5:6], variances[5:]])
    poisoned_counts = torch.cat([counts[:1], counts[:5], counts[5:6], counts[5:]])
    spread = BatchSpread.empty(3).add(poisoned_counts, poisoned_means, poisoned_vars)
    assert spread.batches.tolist() == [12.0] * 3
    torch.testing.assert_close(spread.relative_errors(0.0), direct_relative_errors(counts, means, variances),
                               rtol=1e-9, atol=0)


def test_order_ratio_tells_a_sorted_stream_from_a_shuffled_one():
    counts, means, variances = random_batches(count=200)
    shuffled = BatchSpread.empty(3).add(counts, means, variances).order_ratio()
    ordered = BatchSpread.empty(3).add(counts, means.sort(dim=0).values, variances).order_ratio()
    assert ((shuffled > 0.7) & (shuffled < 1.3)).all(), shuffled
    assert (ordered < 0.05).all(), ordered


def test_t_quantiles_match_the_tables():
    assert two_sided_t_quantile(0.95, 1) == pytest.approx(12.706204736174693, rel=1e-10)
    assert two_sided_t_quantile(0.95, 3) == pytest.approx(3.182446305283708, rel=1e-10)
    assert two_sided_t_quantile(0.99, 10) == pytest.approx(3.169272672616951, rel=1e-10)
    assert two_sided_t_quantile(0.95, 400) == pytest.approx(1.965912343229463, rel=1e-6)
    # Sidak: each of 16 estimates gets 0.95 ** (1 / 16) of the normal; t widens it, one batch bounds nothing.
    assert sidak_quantile(16) == pytest.approx(2.947775, abs=1e-6)
    assert sidak_quantile(1) == pytest.approx(1.959963984540054, rel=1e-12)
    assert t_widening(16, 31) * sidak_quantile(16) == pytest.approx(two_sided_t_quantile(0.95 ** (1 / 16), 30))
    assert t_widening(16, 1) == math.inf
