"""When recalibration has seen enough: every layer's statistics within a stated error bound of their limit."""

from __future__ import annotations

import math

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .accumulator import LayerAccumulator, merged_spreads
from .confidence import CONFIDENCE, sidak_quantile, t_widening
from .spread import BatchSpread

TOLERANCE_MET = "tolerance met"
END_OF_DATA = "end of data"
# Checked after 4 batches, then every eighth of the batches seen so far: the stop overshoots by at most an
# eighth, and the checks cost about a check per eight batches once past 64 (benchmarks/tolerance.py).
FIRST_CHECK, CHECK_GROWTH = 4, 8
# A layer whose batch means change this little between consecutive batches, against their spread, is fed
# an ordered stream (iid batches give about 1).
ORDERED_BELOW, ORDERED_MIN_BATCHES = 0.25, 16
NEWTON_STEPS = 8  # from Sidak's bound, within 1e-12 of the root in 5 steps in the tests


class ErrorBounds:
    """Per-layer error bounds of the pooled statistics, from the accumulators' batch spreads: the largest
    over channels of |mean error| / std and |variance error| / variance at 95% confidence for all of the
    layer's channels together (:mod:`bnguard.confidence`). With several processes every rank merges the same figures and so decides the
    same; each check is one all_gather."""

    def __init__(self, accumulators: dict[_BatchNorm, LayerAccumulator], world_size: int):
        self.accumulators, self.world_size = list(accumulators.values()), world_size
        layers = list(accumulators)
        device = layers[0].running_mean.device
        self.channels = [layer.num_features for layer in layers]
        self.eps = torch.cat([torch.full((layer.num_features,), layer.eps, dtype=torch.float64, device=device)
                              for layer in layers])
        self.index = torch.repeat_interleave(torch.arange(len(layers), device=device),
                                             torch.tensor(self.channels, device=device))
        self.starts = torch.tensor([0, *self.channels[:-1]], device=device).cumsum(0)
        self.estimate_index = self.index.cpu().repeat(2)  # a mean and a variance per channel
        self.next_check = FIRST_CHECK

    def due(self, step: int) -> bool:
        return step >= self.next_check

    def check(self, step: int, done: bool) -> tuple[list[float | None], bool]:
        """Every layer's bound now, over all processes, and whether every process is ``done``."""
        self.next_check = step + max(1, step // CHECK_GROWTH)
        spreads = [accumulator.sum_spread() for accumulator in self.accumulators]
        return self.of(spreads, done)

    def of(self, spreads: list[BatchSpread], done: bool = True, *, merged: bool = False
           ) -> tuple[list[float | None], bool]:
        """The bounds from ``spreads``, this process's (merged over processes here) unless ``merged``."""
        flag = torch.tensor([float(done)], dtype=torch.float64, device=self.eps.device)
        spreads, flags = merged_spreads(spreads, flag, 1 if merged else self.world_size)
        whole = BatchSpread.cat(spreads)
        layers = len(self.channels)
        order = torch.zeros(layers, dtype=torch.float64, device=self.eps.device).index_add_(
            0, self.index, whole.order_ratio().nan_to_num(1.0))
        figures = torch.cat([*whole.relative_errors(self.eps), whole.batches[self.starts], order,
                             flags[:, 0]]).cpu()  # one synchronization
        errors, batches, order, flags = figures.split([2 * self.index.numel(), layers, layers, flags.shape[0]])
        counts = [int(b) for b in batches.tolist()]
        widening = torch.tensor([t_widening(2 * c, b) for c, b in zip(self.channels, counts)], dtype=torch.float64)
        bounds = joint_bounds(errors, self.estimate_index, widening)
        self.order = [(total / channels, b) for total, channels, b in zip(order.tolist(), self.channels, counts)]
        return [None if b == 0 else bound for bound, b in zip(bounds.tolist(), counts)], bool(flags.all())

    def ordered(self) -> list[int]:
        """The layers (by position) whose batches look ordered at the last check, not a random sample."""
        return [i for i, (ratio, batches) in enumerate(self.order)
                if batches >= ORDERED_MIN_BATCHES and ratio < ORDERED_BELOW]


def joint_bounds(errors: torch.Tensor, index: torch.Tensor, widening: torch.Tensor) -> torch.Tensor:
    """Per layer, the B with prod_k P(|e_k| <= B) = 95% over its estimates k (``index`` gives each one's
    layer), e_k normal with standard deviation ``errors`` times the layer's ``widening``; by Newton's method
    on the sum of logs, from Sidak's bound (which is never below it). Infinite for unknown errors."""
    layers = widening.numel()
    scale = errors * widening[index]
    unknown = torch.zeros(layers, dtype=torch.bool).index_put_((index,), ~torch.isfinite(scale), accumulate=True)
    scale = torch.where(torch.isfinite(scale), scale, 1.0)
    top = torch.zeros(layers, dtype=torch.float64).scatter_reduce(0, index, scale, "amax", include_self=False)
    counted = torch.zeros(layers, dtype=torch.float64).index_add_(0, index, torch.ones_like(scale))
    high = torch.tensor([sidak_quantile(int(k)) if k else 0.0 for k in counted.tolist()], dtype=torch.float64) * top
    low, bound, live = sidak_quantile(1) * top, high, scale > 0
    for _ in range(NEWTON_STEPS):
        x = torch.where(live, bound[index] / torch.where(live, scale, 1.0), torch.inf)
        tail = 2 * torch.special.ndtr(-x)  # P(|Z| > x)
        excess = torch.zeros(layers, dtype=torch.float64).index_add_(0, index, torch.log1p(-tail))
        density = torch.where(live, 2 * torch.exp(-x.square() / 2) / math.sqrt(2 * math.pi), 0.0)
        slope = torch.zeros(layers, dtype=torch.float64).index_add_(
            0, index, density / (torch.where(live, scale, 1.0) * (1 - tail)))
        step = (excess - math.log(CONFIDENCE)) / slope.clamp(min=1e-300)
        bound = torch.minimum(torch.maximum(bound - step, low), high)
    return torch.where(unknown, torch.inf, torch.where(top > 0, bound, 0.0))


def met(bounds: list[float | None], tolerance: float) -> bool:
    """Every layer that got batches is within ``tolerance``; one that got none yet (a branch not taken) waits
    for no one."""
    known = [bound for bound in bounds if bound is not None]
    return bool(known) and max(known) <= tolerance
