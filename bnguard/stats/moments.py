"""Exact pooled per-channel statistics: the arithmetic behind recalibration.

Pure torch. Statistics are kept as (count, mean, M2), M2 being the sum of squared deviations from the mean,
in float64, and merged with Chan et al.'s parallel formula. Unlike averaging per-batch variances, the pooled
variance includes the spread of the batch means, and unlike ``E[x^2] - E[x]^2`` it does not cancel
catastrophically when the mean is large against the spread.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Moments:
    """Count, mean and M2 of a set of values, per channel, in float64.

    ``count`` (values seen), ``mean`` and ``m2`` have one entry per channel.
    """

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def empty(cls, num_channels: int, device: torch.device | str | None = None) -> Moments:
        zeros = torch.zeros(num_channels, dtype=torch.float64, device=device)
        return cls(zeros, zeros.clone(), zeros.clone())

    @classmethod
    def of(cls, values: torch.Tensor, channel_dim: int = 1) -> Moments:
        """The moments of ``values`` per channel along ``channel_dim``, computed in float64."""
        x = values.double().movedim(channel_dim, 0).reshape(values.shape[channel_dim], -1)
        mean = x.mean(dim=1)
        m2 = (x - mean[:, None]).square().sum(dim=1)
        return cls(torch.full_like(mean, float(x.shape[1])), mean, m2)

    def merge(self, other: Moments) -> Moments:
        """The moments of the union of both sets (Chan et al.); either side may be empty."""
        count = self.count + other.count
        weight = other.count / count.clamp(min=1.0)
        delta = other.mean - self.mean
        mean = self.mean + delta * weight
        m2 = self.m2 + other.m2 + delta.square() * (self.count * weight)
        return Moments(count, mean, m2)

    def variance(self, unbiased: bool = True) -> torch.Tensor:
        """Per-channel variance; unbiased (n - 1 denominator) is how BatchNorm stores ``running_var``."""
        return self.m2 / (self.count - 1.0 if unbiased else self.count)


def pool_batches(
    counts: torch.Tensor, means: torch.Tensor, unbiased_vars: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[Moments, torch.Tensor]:
    """Pools per-batch statistics as BatchNorm reports them, leaving out batches that are not finite.

    ``counts`` holds B element counts (or B x C, one per channel), ``means`` and ``unbiased_vars`` are
    B x C. By default a batch (row) with any non-finite mean or variance is dropped; ``valid`` (B x C) says
    instead which entries to pool. Returns the pooled moments and the number of rows of which no entry was
    pooled (a 0-dim tensor, so that no device synchronization is needed).
    """
    means = means.double()
    unbiased_vars = unbiased_vars.double()
    if valid is None:
        finite = torch.isfinite(means).all(dim=1) & torch.isfinite(unbiased_vars).all(dim=1)
        valid = finite[:, None].expand_as(means)
    n = torch.where(valid, counts.double().reshape(len(means), -1), 0.0)
    means = torch.where(valid, means, 0.0)
    m2_within = torch.where(valid, unbiased_vars * (n - 1.0).clamp(min=0.0), 0.0)
    count = n.sum(dim=0)
    mean = (n * means).sum(dim=0) / count.clamp(min=1.0)
    m2 = m2_within.sum(dim=0) + (n * (means - mean).square()).sum(dim=0)
    return Moments(count, mean, m2), (~valid.any(dim=1)).sum()
