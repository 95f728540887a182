"""Exact pooled per-channel statistics, and how far they can be from their limit for unlimited data. Pure torch.

Batch b holds n_b elements per channel, with mean m_b and unbiased variance v_b (as BatchNorm reports them).
Around a shift K (a batch mean, against cancellation) its features are f_b = (1, d_b, r_b), with
d_b = m_b - K and r_b = (n_b - 1) / n_b * v_b + d_b^2 its mean square about K. Everything follows from the
float64 sums S1 = sum n_b f_b and S2 = sum n_b^2 f_b f_b^T:

- the pooled mean K + D and M2 (sum of squared deviations from it) of all N elements, with D = S1_d / N and
  M2 = S1_r - N D^2: the exact statistics of the union, spread of the batch means included. About a shift
  near the data, unlike ``E[x^2] - E[x]^2``, this does not cancel when the mean is large against the spread;
- the standard errors of the pooled mean and variance. Batches drawn at random from the data are
  independent, so their statistics are independent draws, and the spread between them measures the error
  whatever the correlation between the elements of one batch (neighbouring pixels of an image). By
  linearization (the delta method):

    var(M) ~ B / (B - 1) * sum n_b^2 (d_b - D)^2 / N^2
    var(V) ~ B / (B - 1) * sum n_b^2 (q_b - V)^2 / N^2,   q_b = r_b - 2 D d_b + D^2

A change of shift maps f linearly, so sums kept around different shifts (on different processes) merge
exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchSums:
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
    def empty(cls, channels: int, device: torch.device | str | None = None) -> BatchSums:
        zeros = torch.zeros(channels, dtype=torch.float64, device=device)
        return cls(zeros, zeros, zeros.new_zeros(channels, 3), zeros.new_zeros(channels, 3, 3), zeros, zeros, zeros)

    def add(self, counts: torch.Tensor, means: torch.Tensor, unbiased_vars: torch.Tensor) -> BatchSums:
        """With B more batches, in the order they came: ``counts`` (B, or B x C) elements per channel,
        ``means`` and ``unbiased_vars`` (B x C) as BatchNorm reports them. An entry whose count is 0 is no
        batch: it is left out whatever its values (a non-finite batch, a layer not called)."""
        n = counts.double().reshape(len(means), -1).expand(means.shape)
        valid = n > 0
        # The values left out are replaced, not only weighed by 0: 0 * NaN would not vanish.
        means, unbiased_vars = torch.where(valid, means.double(), 0.0), torch.where(valid, unbiased_vars.double(), 0.0)
        taken = valid.sum(dim=0)
        seen = taken > 0
        # A first shift: the mean of these batch means, near the data, so the sums about it do not cancel.
        shift = torch.where(self.batches > 0, self.shift, means.sum(dim=0) / taken.clamp(min=1))
        weighted = torch.empty(3, *means.shape, dtype=torch.float64, device=means.device)  # n_b f_b
        by_channel = weighted.permute(2, 1, 0)  # C x B x 3: one batched product gives every S2
        n_f, nd, nr = weighted.unbind()
        d = means - shift
        n_f.copy_(n)
        torch.mul(n, d, out=nd)  # 0 where left out, as n r
        torch.mul(nd, d, out=nr).addcmul_(n, unbiased_vars).sub_(unbiased_vars)  # (n - 1) v + n d^2
        pair = valid & torch.cat([(self.batches > 0)[None], valid[:-1]])
        steps = torch.diff(means, dim=0, prepend=self.last[None])
        rows = torch.arange(1, len(means) + 1, device=means.device)[:, None]
        last_row = (valid * rows).amax(dim=0, keepdim=True).sub(1).clamp(min=0)
        return BatchSums(
            shift=shift,
            batches=self.batches + taken,
            first=self.first + weighted.sum(dim=1).t(),
            second=self.second + torch.bmm(by_channel.transpose(1, 2), by_channel),
            successive=self.successive + (steps.square() * pair).sum(dim=0),
            pairs=self.pairs + pair.sum(dim=0),
            last=torch.where(seen, means.gather(0, last_row)[0], self.last),
        )

    def pooled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per channel, the mean and the unbiased variance (n - 1 denominator, as BatchNorm stores
        ``running_var``) of all the elements of the batches summed: K + D and M2 / (N - 1)."""
        count, sum_d, sum_r = self.first.unbind(dim=1)
        offset = sum_d / count.clamp(min=1.0)
        return self.shift + offset, (sum_r - offset * sum_d).clamp(min=0.0) / (count - 1.0)

    def shifted(self, shift: torch.Tensor) -> BatchSums:
        """The same sums about another shift: d' = d + delta, r' = r + 2 delta d + delta^2."""
        delta = self.shift - shift
        zero, one = torch.zeros_like(delta), torch.ones_like(delta)
        a = torch.stack([torch.stack([one, zero, zero], -1), torch.stack([delta, one, zero], -1),
                         torch.stack([delta.square(), 2 * delta, one], -1)], dim=-2)  # (C, 3, 3): f' = a f
        first = torch.einsum("ckl,cl->ck", a, self.first)
        second = torch.einsum("ckl,clm,cnm->ckn", a, self.second, a)
        return BatchSums(shift, self.batches, first, second, self.successive, self.pairs, self.last)

    def merge(self, other: BatchSums) -> BatchSums:
        """Both sets of batches, about this one's shift (the other's when this one is empty)."""
        shift = torch.where(self.batches > 0, self.shift, other.shift)
        mine, theirs = self.shifted(shift), other.shifted(shift)
        return BatchSums(shift, mine.batches + theirs.batches, mine.first + theirs.first,
                           mine.second + theirs.second, mine.successive + theirs.successive,
                           mine.pairs + theirs.pairs, torch.where(other.batches > 0, other.last, self.last))

    def _parts(self) -> tuple[torch.Tensor, ...]:
        return (self.shift, self.batches, self.first, self.second, self.successive, self.pairs, self.last)

    def packed(self) -> torch.Tensor:
        """Every sum in one flat vector, to send to other processes in one collective."""
        return torch.cat([part.flatten() for part in self._parts()])

    @classmethod
    def unpacked(cls, vector: torch.Tensor, channels: int) -> BatchSums:
        """The sums that :meth:`packed` gave ``vector`` for."""
        shapes = [part.shape for part in cls.empty(channels, "meta")._parts()]
        parts = vector.split([shape.numel() for shape in shapes])
        return cls(*(part.reshape(shape) for part, shape in zip(parts, shapes)))

    def _centered(self) -> tuple[torch.Tensor, ...]:
        """The pooled features D and R (F = S1 / N = (1, D, R)) and the entries 11, 12, 22 of
        sum n_b^2 (f_b - F)(f_b - F)^T = S2 - F S2_0^T - S2_0 F^T + S2_00 F F^T, one channel per entry."""
        d, r = (self.first[:, 1:] / self.first[:, :1].clamp(min=1.0)).unbind(dim=1)
        s = self.second
        weights, with_d, with_r = s[:, 0, 0], s[:, 0, 1], s[:, 0, 2]
        dd = s[:, 1, 1] - 2 * d * with_d + weights * d.square()
        dr = s[:, 1, 2] - d * with_r - r * with_d + weights * d * r
        rr = s[:, 2, 2] - 2 * r * with_r + weights * r.square()
        return d, r, dd, dr, rr

    def relative_errors(self, eps: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per channel, the standard errors of the pooled mean over sqrt(V + eps) and of the pooled variance
        over V + eps. Infinite below two batches."""
        n, b = self.first[:, 0], self.batches
        d, r, dd, dr, rr = self._centered()
        variance = (r - d.square()).clamp(min=0.0) * n / (n - 1.0).clamp(min=1.0)
        scale = b / (b - 1.0).clamp(min=1.0) / n.clamp(min=1.0).square()
        var_of_mean = (dd * scale).clamp(min=0.0)
        # q_b = r_b - 2 D d_b + D^2 moves with f_b along (0, -2D, 1).
        var_of_var = ((4 * d.square() * dd - 4 * d * dr + rr) * scale).clamp(min=0.0)
        of_mean = torch.where(b > 1, var_of_mean.sqrt() / (variance + eps).sqrt(), torch.inf)
        return of_mean, torch.where(b > 1, var_of_var.sqrt() / (variance + eps), torch.inf)

    def order_ratio(self) -> torch.Tensor:
        """Per channel, the mean squared difference of consecutive batch means over twice their variance:
        about 1 for batches in random order, near 0 when each batch resembles the one before."""
        spread = self._centered()[2] / self.second[:, 0, 0].clamp(min=1.0)
        return self.successive / self.pairs.clamp(min=1.0) / (2 * spread)
