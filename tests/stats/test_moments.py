import math

import torch

from bnguard.stats.moments import Moments, pool_batches


def test_merge_is_the_moments_of_the_union():
    a, b = torch.randn(3, 40) * 3 + 7, torch.randn(3, 9) - 2
    merged = Moments.of(a, channel_dim=0).merge(Moments.of(b, channel_dim=0))
    union = torch.cat([a, b], dim=1).double()
    assert merged.count.tolist() == [49.0] * 3
    torch.testing.assert_close(merged.mean, union.mean(dim=1), rtol=1e-14, atol=0)
    torch.testing.assert_close(merged.variance(), union.var(dim=1), rtol=1e-13, atol=0)
    torch.testing.assert_close(merged.variance(unbiased=False), union.var(dim=1, unbiased=False), rtol=1e-13, atol=0)


def test_merge_with_empty_is_identity_on_both_sides():
    m = Moments.of(torch.randn(2, 5, 3))
    for merged in (Moments.empty(5).merge(m), m.merge(Moments.empty(5))):
        assert torch.equal(merged.count, m.count)
        torch.testing.assert_close(merged.mean, m.mean, rtol=1e-15, atol=0)
        torch.testing.assert_close(merged.m2, m.m2, rtol=1e-15, atol=0)


def test_pool_batches_closed_form_and_nonfinite_rows():
    # Batch k holds 0..n_k-1 plus an offset: each batch's mean and unbiased variance are known in closed
    # form, and so is the union's.
    sizes, offsets = [4, 10, 1, 7], [100.0, 101.5, 99.0, 100.25]
    values = [torch.arange(n, dtype=torch.float64) + o for n, o in zip(sizes, offsets)]
    means = torch.tensor([[(n - 1) / 2 + o] for n, o in zip(sizes, offsets)], dtype=torch.float64)
    variances = torch.tensor([[n * (n + 1) / 12 if n > 1 else 0.0] for n in sizes], dtype=torch.float64)
    means = torch.cat([means, torch.tensor([[math.nan]])])  # a fifth batch, poisoned
    variances = torch.cat([variances, torch.tensor([[1.0]])])
    counts = torch.tensor([*sizes, 5], dtype=torch.float64)
    pooled, dropped = pool_batches(counts, means, variances)
    union = torch.cat(values)
    assert dropped.item() == 1
    assert pooled.count.tolist() == [sum(sizes)]
    torch.testing.assert_close(pooled.mean, union.mean().reshape(1), rtol=1e-15, atol=0)
    torch.testing.assert_close(pooled.variance(), union.var().reshape(1), rtol=1e-14, atol=0)
