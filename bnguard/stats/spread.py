"""How far pooled statistics can be from their limit for unlimited data: standard errors from the spread
between batches. Pure torch.

Batches drawn at random from the data are independent, so their statistics are independent draws, and the
spread between them measures the error of the pooled estimate whatever the correlation between the elements
of one batch (neighbouring pixels of an image). Batch b holds n_b elements per channel, with mean m_b and
unbiased variance v_b. Around a shift K (a batch mean, against cancellation) its features are
f_b = (1, d_b, r_b), with d_b = m_b - K and r_b = (n_b - 1) / n_b * v_b + d_b^2 its mean square about K. The
sums S1 = sum n_b f_b and S2 = sum n_b^2 f_b f_b^T give the pooled mean M = K + D and variance V, and by
linearization (the delta method) the variances of their errors:

    var(M) ~ B / (B - 1) * sum n_b^2 (d_b - D)^2 / N^2
    var(V) ~ B / (B - 1) * sum n_b^2 (q_b - V)^2 / N^2,   q_b = r_b - 2 D d_b + D^2

A change of shift maps f linearly, so sums kept around different shifts (on different processes) merge
exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class BatchSpread:
    """Per-channel sums over batches of their statistics' features, in float64.

    ``successive`` sums the squared differences of consecutive batch means, over ``pairs`` pairs; against
    the spread of all batch means it tells a random stream (ratio about 1) from an ordered one (near 0).
    """

    shift: torch.Tensor  # (C,)
    batches: torch.Tensor  # (C,): batches summed, the same for every channel of a layer
    first: torch.Tensor  # (C, 3): sum n_b f_b
    second: torch.Tensor  # (C, 3, 3): sum n_b^2 f_b f_b^T
    successive: torch.Tensor  # (C,)
    pairs: torch.Tensor  # (C,)
    last: torch.Tensor  # (C,): the last batch mean, from which the next call's first difference is taken

    @classmethod
    def empty(cls, channels: int, device: torch.device | str | None = None) -> BatchSpread:
        zeros = torch.zeros(channels, dtype=torch.float64, device=device)
        return cls(zeros, zeros, zeros.new_zeros(channels, 3), zeros.new_zeros(channels, 3, 3), zeros, zeros, zeros)

    def add(self, counts: torch.Tensor, means: torch.Tensor, unbiased_vars: torch.Tensor,
            valid: torch.Tensor | None = None) -> BatchSpread:
        """With B more batches, in the order they came: ``counts`` (B, or B x C) elements per channel,
        ``means`` and ``unbiased_vars`` (B x C) as BatchNorm reports them. ``valid`` (B x C) says which
        entries are batches to add (by default the rows whose values are all finite)."""
        means, unbiased_vars = means.double(), unbiased_vars.double()
        if valid is None:
            valid = (torch.isfinite(means).all(dim=1) & torch.isfinite(unbiased_vars).all(dim=1))[:, None]
        valid = valid.expand_as(means)
        n = torch.where(valid, counts.double().reshape(len(means), -1), 0.0)
        taken = valid.sum(dim=0)
        seen = taken > 0
        # A first shift: the mean of these batch means, near the data, so the sums about it do not cancel.
        start = torch.where(valid, means, 0.0).sum(dim=0) / taken.clamp(min=1)
        shift = torch.where(self.batches > 0, self.shift, torch.where(seen, start, 0.0))
        d = torch.where(valid, means - shift, 0.0)
        r = torch.where(valid, unbiased_vars * ((n - 1.0).clamp(min=0.0) / n.clamp(min=1.0)) + d.square(), 0.0)
        weighted = torch.stack([n.t(), (n * d).t(), (n * r).t()], dim=1)  # n_b f_b, C x 3 x B
        steps = torch.cat([means[:1] - self.last[None], means[1:] - means[:-1]])
        pair = valid & torch.cat([(self.batches > 0)[None], valid[:-1]])
        rows = torch.arange(1, len(means) + 1, device=means.device)[:, None]
        last_row = (valid * rows).amax(dim=0, keepdim=True).sub(1).clamp(min=0)
        return BatchSpread(
            shift=shift,
            batches=self.batches + taken,
            first=self.first + weighted.sum(dim=2),
            second=self.second + torch.bmm(weighted, weighted.transpose(1, 2)),
            successive=self.successive + torch.where(pair, steps.square(), 0.0).sum(dim=0),
            pairs=self.pairs + pair.sum(dim=0),
            last=torch.where(seen, means.gather(0, last_row)[0], self.last),
        )

    def shifted(self, shift: torch.Tensor) -> BatchSpread:
        """The same sums about another shift: d' = d + delta, r' = r + 2 delta d + delta^2."""
        delta = self.shift - shift
        zero, one = torch.zeros_like(delta), torch.ones_like(delta)
        a = torch.stack([torch.stack([one, zero, zero], -1), torch.stack([delta, one, zero], -1),
                         torch.stack([delta.square(), 2 * delta, one], -1)], dim=-2)  # (C, 3, 3): f' = a f
        first = torch.einsum("ckl,cl->ck", a, self.first)
        second = torch.einsum("ckl,clm,cnm->ckn", a, self.second, a)
        return BatchSpread(shift, self.batches, first, second, self.successive, self.pairs, self.last)

    def merge(self, other: BatchSpread) -> BatchSpread:
        """Both sets of batches, about this one's shift (the other's when this one is empty)."""
        shift = torch.where(self.batches > 0, self.shift, other.shift)
        mine, theirs = self.shifted(shift), other.shifted(shift)
        return BatchSpread(shift, mine.batches + theirs.batches, mine.first + theirs.first,
                           mine.second + theirs.second, mine.successive + theirs.successive,
                           mine.pairs + theirs.pairs, torch.where(other.batches > 0, other.last, self.last))

    def _parts(self) -> tuple[torch.Tensor, ...]:
        return (self.shift, self.batches, self.first, self.second, self.successive, self.pairs, self.last)

    def packed(self) -> torch.Tensor:
        """Every sum in one flat vector, to send to other processes in one collective."""
        return torch.cat([part.flatten() for part in self._parts()])

    @classmethod
    def unpacked(cls, vector: torch.Tensor, channels: int) -> BatchSpread:
        """The spread that :meth:`packed` gave ``vector`` for."""
        shapes = [part.shape for part in cls.empty(channels, "meta")._parts()]
        parts = vector.split([shape.numel() for shape in shapes])
        return cls(*(part.reshape(shape) for part, shape in zip(parts, shapes)))

    @cached_property
    def _centered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooled features F = S1 / N = (1, D, R) and sum n_b^2 (f_b - F)(f_b - F)^T (computed once: both
        the errors and the order ratio need them)."""
        moments = self.first / self.first[:, :1].clamp(min=1.0)
        outer = moments[:, :, None] * self.second[:, None, :, 0]
        centered = (self.second - outer - outer.transpose(1, 2)
                    + self.second[:, :1, :1] * moments[:, :, None] * moments[:, None, :])
        return moments, centered

    def relative_errors(self, eps: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per channel, the standard errors of the pooled mean over sqrt(V + eps) and of the pooled variance
        over V + eps. Infinite below two batches."""
        n, b = self.first[:, 0], self.batches
        moments, centered = self._centered
        d = moments[:, 1]
        variance = (moments[:, 2] - d.square()).clamp(min=0.0) * n / (n - 1.0).clamp(min=1.0)
        influence = torch.stack([torch.zeros_like(d), -2 * d, torch.ones_like(d)], dim=-1)  # of q_b, per f_b
        scale = b / (b - 1.0).clamp(min=1.0) / n.clamp(min=1.0).square()
        var_of_mean = (centered[:, 1, 1] * scale).clamp(min=0.0)
        var_of_var = (torch.einsum("ck,ckl,cl->c", influence, centered, influence) * scale).clamp(min=0.0)
        of_mean = torch.where(b > 1, var_of_mean.sqrt() / (variance + eps).sqrt(), torch.inf)
        return of_mean, torch.where(b > 1, var_of_var.sqrt() / (variance + eps), torch.inf)

    def order_ratio(self) -> torch.Tensor:
        """Per channel, the mean squared difference of consecutive batch means over twice their variance:
        about 1 for batches in random order, near 0 when each batch resembles the one before."""
        _, centered = self._centered
        spread = centered[:, 1, 1] / self.second[:, 0, 0].clamp(min=1.0)
        return self.successive / self.pairs.clamp(min=1.0) / (2 * spread)
