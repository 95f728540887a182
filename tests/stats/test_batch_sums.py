"""BatchSums: the exact pooled statistics of batches, and the standard errors from the spread between them."""

import math

import torch

from bnguard.stats.batch_sums import BatchSums


def random_batches(count=50, channels=3, seed=0, offset=1e4):
    generator = torch.Generator().manual_seed(seed)
    counts = torch.randint(10, 40, (count,), generator=generator).double()
    means = torch.randn(count, channels, generator=generator, dtype=torch.float64) * 0.3 + offset
    variances = torch.rand(count, channels, generator=generator, dtype=torch.float64) + 0.5
    return counts, means, variances


def direct_pooled(counts, means, variances):
    """The union's mean and M2 written out: within-batch sums of squares plus the spread of the batch means."""
    n = counts[:, None]
    mean = (n * means).sum(dim=0) / n.sum()
    return mean, ((n - 1) * variances).sum(dim=0) + (n * (means - mean).square()).sum(dim=0)


def direct_relative_errors(counts, means, variances):
    """The delta-method standard errors written out batch by batch, in float64, about the pooled mean."""
    mean, m2 = direct_pooled(counts, means, variances)
    n, b = counts.sum(), len(counts)
    w = (counts / n)[:, None]
    q = ((counts - 1) / counts)[:, None] * variances + (means - mean).square()
    var_of_mean = b / (b - 1) * (w * (means - mean)).square().sum(dim=0)
    var_of_var = b / (b - 1) * (w * (q - m2 / n)).square().sum(dim=0)
    variance = m2 / (n - 1)
    return var_of_mean.sqrt() / variance.sqrt(), var_of_var.sqrt() / variance


def test_pooled_statistics_closed_form_with_a_batch_of_count_0_left_out_whatever_its_values():
    # Batch k holds 0..n_k-1 plus an offset: each batch's mean and unbiased variance are known in closed
    # form, and so is the union's.
    sizes, offsets = [4, 10, 1, 7], [100.0, 101.5, 99.0, 100.25]
    values = torch.cat([torch.arange(n, dtype=torch.float64) + o for n, o in zip(sizes, offsets)])
    means = torch.tensor([[(n - 1) / 2 + o] for n, o in zip(sizes, offsets)] + [[math.nan]], dtype=torch.float64)
    variances = torch.tensor([[n * (n + 1) / 12 if n > 1 else 0.0] for n in sizes] + [[1.0]], dtype=torch.float64)
    sums = BatchSums.empty(1).add(torch.tensor([*sizes, 0], dtype=torch.float64), means, variances)
    mean, variance = sums.pooled()
    assert sums.batches.tolist() == [4.0] and sums.first[:, 0].tolist() == [sum(sizes)]
    torch.testing.assert_close(mean, values.mean().reshape(1), rtol=1e-15, atol=0)
    torch.testing.assert_close(variance, values.var().reshape(1), rtol=1e-14, atol=0)


def test_pooled_statistics_of_halves_summed_about_other_shifts_are_the_union_s():
    generator = torch.Generator().manual_seed(3)
    batches = [torch.randn(3, size, generator=generator, dtype=torch.float64) * 2 + 5e3 * (i % 2)
               for i, size in enumerate([40, 9, 17, 30, 2, 11])]  # two far-apart groups

    def summed(part):
        counts = torch.tensor([float(b.shape[1]) for b in part], dtype=torch.float64)
        return BatchSums.empty(3).add(counts, torch.stack([b.mean(dim=1) for b in part]),
                                      torch.stack([b.var(dim=1) for b in part]))

    union = torch.cat(batches, dim=1)
    for sums in (summed(batches), summed(batches[:3]).merge(summed(batches[3:])),
                 BatchSums.empty(3).merge(summed(batches)), summed(batches).merge(BatchSums.empty(3))):
        mean, variance = sums.pooled()
        torch.testing.assert_close(mean, union.mean(dim=1), rtol=1e-14, atol=0)
        torch.testing.assert_close(variance, union.var(dim=1), rtol=1e-13, atol=0)


def test_pooled_statistics_do_not_cancel_far_from_zero():
    # Means near 1e4 against a spread near 1: E[x^2] - E[x]^2 would lose 8 of float64's 16 digits.
    counts, means, variances = random_batches(count=200, offset=1e4)
    sums = BatchSums.empty(3)
    for start in range(0, 200, 64):
        sums = sums.add(counts[start:start + 64], means[start:start + 64], variances[start:start + 64])
    mean, m2 = direct_pooled(counts, means, variances)
    pooled_mean, pooled_variance = sums.pooled()
    torch.testing.assert_close(pooled_mean, mean, rtol=1e-15, atol=0)
    torch.testing.assert_close(pooled_variance, m2 / (counts.sum() - 1), rtol=1e-13, atol=0)


def test_sums_give_the_direct_standard_errors_far_from_zero_and_in_pieces():
    counts, means, variances = random_batches()
    sums = BatchSums.empty(3)
    for start, end in [(0, 7), (7, 30), (30, 50)]:
        sums = sums.add(counts[start:end], means[start:end], variances[start:end])
    torch.testing.assert_close(sums.relative_errors(0.0), direct_relative_errors(counts, means, variances),
                               rtol=1e-9, atol=0)
    assert sums.batches.tolist() == [50.0] * 3


def test_sums_about_other_shifts_merge_exactly():
    counts, means, variances = random_batches()
    whole = BatchSums.empty(3).add(counts, means, variances)
    halves = BatchSums.empty(3).add(counts[:20], means[:20], variances[:20]).merge(
        BatchSums.empty(3).add(counts[20:], means[20:], variances[20:]))  # sums about another shift
    assert not torch.equal(halves.shift, whole.shift)
    torch.testing.assert_close(halves.first, whole.shifted(halves.shift).first, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(halves.second, whole.shifted(halves.shift).second, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(halves.relative_errors(0.0), whole.relative_errors(0.0), rtol=1e-9, atol=0)


def test_batches_of_count_0_are_left_out_of_the_spread_as_of_the_pooled_statistics():
    counts, means, variances = random_batches(count=12)
    poisoned_means = torch.cat([means[:1] * math.nan, means[:5], means[5:6] * math.inf, means[5:]])
    poisoned_vars = torch.cat([variances[:1], variances[:5], variances[5:6] * math.nan, variances[5:]])
    poisoned_counts = torch.cat([counts[:1] * 0, counts[:5], counts[5:6] * 0, counts[5:]])
    sums = BatchSums.empty(3).add(poisoned_counts, poisoned_means, poisoned_vars)
    assert sums.batches.tolist() == [12.0] * 3
    torch.testing.assert_close(sums.relative_errors(0.0), direct_relative_errors(counts, means, variances),
                               rtol=1e-9, atol=0)
    mean, m2 = direct_pooled(counts, means, variances)
    torch.testing.assert_close(sums.pooled()[0], mean, rtol=1e-15, atol=0)


def test_order_ratio_tells_a_sorted_stream_from_a_shuffled_one():
    counts, means, variances = random_batches(count=200)
    shuffled = BatchSums.empty(3).add(counts, means, variances).order_ratio()
    ordered = BatchSums.empty(3).add(counts, means.sort(dim=0).values, variances).order_ratio()
    assert ((shuffled > 0.7) & (shuffled < 1.3)).all(), shuffled
    assert (ordered < 0.05).all(), ordered
