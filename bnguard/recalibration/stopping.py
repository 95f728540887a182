"""When recalibration has seen enough: every layer's statistics within a stated error bound of their limit."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from ..stats.batch_sums import BatchSums
from ..stats.confidence import CONFIDENCE, sidak_quantile, t_widening
from .accumulator import Accumulators, merged_sums
from .layers import channels as layer_channels

TOLERANCE_MET = "tolerance met"
END_OF_DATA = "end of data"
# Checked after 4 batches, then every second batch up to 16 and every eighth of the batches seen after: the
# stop overshoots by at most one batch or an eighth, and a check, a few tensor operations on all layers at
# once, costs about a quarter of a batch's forward on the example's network (one CPU thread).
FIRST_CHECK, CHECK_SPACING, CHECK_GROWTH = 4, 2, 8
# A layer whose batch means change this little between consecutive batches, against their spread, is fed
# an ordered stream (iid batches give about 1).
ORDERED_BELOW, ORDERED_MIN_BATCHES = 0.25, 16
MAX_STEPS = 60  # bisection alone would reach 1e-10 of the bracket in 34; Newton takes about 5


class ErrorBounds:
    """Per-layer error bounds of the pooled statistics, from the spread between batches: the largest
    over channels of |mean error| / std and |variance error| / variance at 95% confidence for all of the
    layer's channels together (:mod:`bnguard.confidence`). With several processes every rank merges the same
    figures and so decides the same; each check is one all_gather. ``tolerance``: what :meth:`check` asks of
    every layer (None: no stopping on the bounds)."""

    def __init__(self, accumulators: Accumulators, world_size: int, tolerance: float | None = None):
        self.accumulators, self.world_size = accumulators, world_size
        self.tolerance = tolerance
        layers = accumulators.layers
        self.channels = [layer_channels(layer) for layer in layers]
        self.eps = accumulators.eps
        self.index = accumulators.index
        self.starts = torch.tensor(accumulators.bounds[:-1], device=accumulators.device)
        self.estimate_index = accumulators.host_index.repeat(2)  # a mean and a variance per channel
        self.next_check = FIRST_CHECK

    def due(self, step: int) -> bool:
        return step >= self.next_check

    def check(self, step: int, done: bool) -> tuple[bool, bool]:
        """Whether every layer is within the tolerance now, over all processes (a layer that got no batch
        yet, a branch not taken, waits for no one), and whether every process is ``done``. Deciding needs
        the joint coverage at ``tolerance`` only, not the bounds themselves."""
        self.next_check = step + max(CHECK_SPACING, step // CHECK_GROWTH)
        errors, counts, widening, everyone_done = self._measure(self.accumulators.current_sums(), done, merged=False)
        within = joint_coverage_at(self.tolerance, errors, self.estimate_index, widening).tolist()
        fed = [ok for ok, batches in zip(within, counts) if batches]
        return bool(fed) and all(fed), everyone_done

    def of(self, sums: BatchSums, *, merged: bool) -> list[float | None]:
        """Every layer's bound from ``sums`` (all layers' channels), None for a layer that got no batch or
        whose bound is unknown; this process's sums, merged over processes here, unless ``merged``."""
        errors, counts, widening, _ = self._measure(sums, True, merged=merged)
        bounds = joint_bounds(errors, self.estimate_index, widening)
        return [bound if b and math.isfinite(bound) else None for bound, b in zip(bounds.tolist(), counts)]

    def deferred(self, sums: BatchSums) -> list[Callable[[], float | None]]:
        """Every layer's bound from the merged ``sums`` as a function that computes them all on its first call:
        a caller who never reads the bounds does not pay for them. No collective: any rank may call it."""
        every = functools.cache(lambda: self.of(sums, merged=True))
        return [lambda i=i: every()[i] for i in range(len(self.channels))]

    def _measure(self, sums: BatchSums, done: bool, *, merged: bool
                 ) -> tuple[torch.Tensor, list[int], torch.Tensor, bool]:
        """The relative standard errors of every estimate (on the CPU), each layer's batches and t widening,
        and whether every process is ``done``."""
        flag = torch.tensor([float(done)], dtype=torch.float64, device=self.eps.device)
        whole, flags = merged_sums(sums, flag, 1 if merged else self.world_size)
        layers = len(self.channels)
        figures = torch.cat([*whole.relative_errors(self.eps), whole.batches[self.starts], flags[:, 0]]).cpu()
        errors, batches, flags = figures.split([2 * self.index.numel(), layers, flags.shape[0]])  # one sync
        counts = [int(b) for b in batches.tolist()]
        widening = torch.tensor([t_widening(2 * c, b) for c, b in zip(self.channels, counts)], dtype=torch.float64)
        return errors, counts, widening, bool(flags.all())

    def ordered(self, sums: BatchSums) -> list[int]:
        """The layers (by position) whose batches in the merged ``sums`` look ordered, not a random sample."""
        layers = len(self.channels)
        ratios = torch.zeros(layers, dtype=torch.float64, device=self.eps.device).index_add_(
            0, self.index, sums.order_ratio().nan_to_num(1.0))
        figures = torch.cat([ratios, sums.batches[self.starts]]).tolist()
        return [i for i, (total, channels, batches) in enumerate(zip(figures[:layers], self.channels, figures[layers:]))
                if batches >= ORDERED_MIN_BATCHES and total / channels < ORDERED_BELOW]


class _Estimates(NamedTuple):
    """The estimates that take part (a finite, nonzero standard deviation sigma; one without spread is exact),
    each one's layer and 1 / (sigma sqrt 2); per layer, whether one of its estimates is unknown (infinite) and
    the largest sigma."""

    layer: torch.Tensor
    inverse: torch.Tensor
    unknown: torch.Tensor
    top: torch.Tensor


def _estimates(errors: torch.Tensor, index: torch.Tensor, widening: torch.Tensor) -> _Estimates:
    layers = widening.numel()
    scale = errors * widening[index]
    finite = torch.isfinite(scale)
    unknown = torch.zeros(layers, dtype=torch.bool).index_put_((index,), ~finite, accumulate=True)
    live = finite & (scale > 0)
    scale, layer = scale[live], index[live]  # left out once here, not masked at every step of the root
    top = torch.zeros(layers, dtype=torch.float64).scatter_reduce(0, layer, scale, "amax", include_self=False)
    return _Estimates(layer, 1 / (scale * math.sqrt(2)), unknown, top)


def _shortfall(bound: torch.Tensor, estimates: _Estimates, slope: bool = False) -> tuple[torch.Tensor, ...]:
    """G(B) = -sum_k log P(|e_k| <= B) per layer at the per-layer ``bound``, and with ``slope`` -G'(B): with
    x = B / (sigma sqrt 2), P(|e_k| > B) = erfc(x), whose derivative is -2 / sqrt(pi) exp(-x^2) / (sigma sqrt 2)."""
    x = bound[estimates.layer] * estimates.inverse
    tail = torch.special.erfc(x)
    terms = [-torch.log1p(-tail)]
    if slope:
        terms.append(torch.exp(-x.square()) * estimates.inverse * (2 / math.sqrt(math.pi)) / (1 - tail))
    sums = torch.zeros(bound.numel(), len(terms), dtype=torch.float64).index_add_(
        0, estimates.layer, torch.stack(terms, dim=1))
    return sums.unbind(dim=1)


def joint_coverage_at(tolerance: float, errors: torch.Tensor, index: torch.Tensor, widening: torch.Tensor
                      ) -> torch.Tensor:
    """Per layer, whether its joint bound (:func:`joint_bounds`) is within ``tolerance``: G decreases, so
    that is G(tolerance) <= -log 95%, one evaluation instead of a root."""
    estimates = _estimates(errors, index, widening)
    (total,) = _shortfall(torch.full(widening.shape, tolerance, dtype=torch.float64), estimates)
    return ~estimates.unknown & (total <= -math.log(CONFIDENCE))


def joint_bounds(errors: torch.Tensor, index: torch.Tensor, widening: torch.Tensor) -> torch.Tensor:
    """Per layer, the B with prod_k P(|e_k| <= B) = 95% over its estimates k (``index`` gives each one's
    layer), e_k normal with standard deviation ``errors`` times the layer's ``widening``, to a relative
    1e-10. Infinite for unknown errors.

    With G(B) = -sum_k log P(|e_k| <= B), the root of log G(B) = log(-log 95%) is bracketed by the bound of
    the largest estimate alone and Sidak's bound (all estimates as large as the largest); Newton's method on
    log G, nearly linear near the root where G itself falls like a Gaussian tail, falls back to bisection
    whenever it would leave the bracket."""
    estimates = _estimates(errors, index, widening)
    top = estimates.top
    low = sidak_quantile(1) * top
    counts = torch.bincount(index, minlength=widening.numel()).tolist()  # every estimate of a layer, exact ones too
    high = torch.tensor([sidak_quantile(k) if k else 0.0 for k in counts], dtype=torch.float64) * top
    target, bound = -math.log(CONFIDENCE), high
    for _ in range(MAX_STEPS):
        total, slope = _shortfall(bound, estimates, slope=True)
        covered = total <= target
        high, low = torch.where(covered, bound, high), torch.where(covered, low, bound)
        newton = bound + (total.log() - math.log(target)) * total / slope  # -G / G' = total / slope
        inside = (newton >= low) & (newton <= high)
        step = torch.where(inside, newton, (low + high) / 2) - bound
        bound = bound + step
        if bool((step.abs() <= 1e-10 * bound).all()):
            break
    return torch.where(estimates.unknown, torch.inf, torch.where(top > 0, bound, 0.0))
