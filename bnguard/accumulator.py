"""Collecting each BatchNorm layer's per-call statistics during recalibration, and merging them across
processes."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .distributed import all_gather
from .spread import BatchSpread
from .stats import Moments, pool_batches


class LayerTotals(NamedTuple):
    """Everything one layer saw: pooled moments, calls left out as non-finite, samples, calls, and calls
    left out because they held one value per channel."""

    moments: Moments
    nonfinite: int
    samples: int
    calls: int
    one_value: int  # calls left out: one value per channel, which BatchNorm cannot train-normalize
    spread: BatchSpread


# One layer's totals travel between processes as a float64 vector: these scalars, then mean and M2.
_SCALARS = ("count", "nonfinite", "samples", "calls", "one_value")
# The gathered vector of one process starts with its global counts.
_HEADER = ("batches", "samples")


def _pack(moments: Moments, nonfinite: torch.Tensor, spread: BatchSpread, samples: int, calls: int,
          one_value: int) -> torch.Tensor:
    device = moments.mean.device
    host = {"samples": samples, "calls": calls, "one_value": one_value}
    scalars = {"count": moments.count, "nonfinite": nonfinite.double(),
               **{name: torch.tensor(float(value), dtype=torch.float64, device=device) for name, value in host.items()}}
    return torch.cat([torch.stack([scalars[name] for name in _SCALARS]), moments.mean, moments.m2,
                      pack_spread(spread)])


def _unpack(vector: torch.Tensor, channels: int) -> tuple[Moments, dict[str, torch.Tensor], BatchSpread]:
    head, mean, m2, spread = vector.split([len(_SCALARS), channels, channels, vector.numel() - len(_SCALARS)
                                           - 2 * channels])
    scalars = dict(zip(_SCALARS, head))
    return Moments(scalars["count"], mean, m2), scalars, unpack_spread(spread, channels)


def pack_spread(spread: BatchSpread) -> torch.Tensor:
    return torch.cat([part.flatten() for part in spread.astuple()])


def unpack_spread(vector: torch.Tensor, channels: int) -> BatchSpread:
    shapes = [part.shape for part in BatchSpread.empty(channels, "meta").astuple()]
    parts = vector.split([shape.numel() for shape in shapes])
    return BatchSpread(*(part.reshape(shape) for part, shape in zip(parts, shapes)))


class LayerAccumulator:
    """Collects one layer's per-call batch statistics with no device synchronization.

    Every call computes its batch mean and unbiased variance with BatchNorm's own kernel, at momentum 1,
    into a row of this object's chunk tensors, so the layer's real buffers are never touched. A stock
    BatchNorm layer runs :meth:`forward_of` in place of its forward (no hook dispatch, no momentum or call
    counter); a subclass with a forward of its own keeps it, fed by the pre-hook :meth:`before_call`. Full
    chunks are pooled into float64 moments, and their rows summed into the layer's :class:`BatchSpread`.
    """

    chunk = 64

    def __init__(self, layer: _BatchNorm):
        buffer = layer.running_mean
        self.means = torch.zeros(self.chunk, layer.num_features, dtype=buffer.dtype, device=buffer.device)
        self.variances = torch.zeros_like(self.means)
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []  # row views, made once each, on first use
        self.calls = torch.zeros((), dtype=torch.long, device=buffer.device)
        self.counts: list[int] = []
        self.moments: Moments | None = None
        self.nonfinite: torch.Tensor | None = None
        self.spread = BatchSpread.empty(layer.num_features, buffer.device)
        self.summed_rows = 0  # rows of the chunk already in the spread
        self.samples = 0
        self.batches = 0
        self.one_value = 0
        self._statistics = (layer.running_mean, layer.running_var)  # the layer's own, read in eval mode only

    def _next_row(self, layer: _BatchNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The row this call writes; None for a call of one value per channel, which train mode would refuse:
        it normalizes as in eval mode, with the layer's own statistics, and is left out."""
        if x.numel() == layer.num_features:
            self.one_value += 1
            return None
        if len(self.counts) == self.chunk:  # every row written by now: pool them, free the rows
            self.flush()
        self.counts.append(x.numel() // layer.num_features)
        self.samples += x.shape[0]
        self.batches += 1
        row = len(self.counts) - 1
        if row == len(self.rows):
            self.rows.append((self.means[row], self.variances[row]))
        return self.rows[row]

    def forward_of(self, layer: _BatchNorm) -> Callable[[torch.Tensor], torch.Tensor]:
        """A stock BatchNorm forward that writes this call's statistics into its row."""
        def forward(input: torch.Tensor) -> torch.Tensor:
            layer._check_input_dim(input)
            row = self._next_row(layer, input)
            mean, var = self._statistics if row is None else row
            return F.batch_norm(input, mean, var, layer.weight, layer.bias, row is not None, 1.0, layer.eps)
        return forward

    def before_call(self, layer: _BatchNorm, args: tuple, kwargs: dict) -> None:
        """For a layer with a forward of its own, run at momentum 1: points its buffers at the row."""
        row = self._next_row(layer, args[0] if args else kwargs["input"])  # bn(x) or bn(input=x)
        layer.training = row is not None  # back to train mode at the next call after a one-value one
        # Direct dict access: this runs before every layer call, and the names are plain buffers.
        layer._buffers["running_mean"], layer._buffers["running_var"] = self._statistics if row is None else row
        if row is not None:
            layer._buffers["num_batches_tracked"] = self.calls
        return None

    def sum_spread(self) -> BatchSpread:
        """The spread of every call so far (rows not yet summed are summed now)."""
        rows = len(self.counts)
        if rows > self.summed_rows:
            counts = torch.tensor(self.counts[self.summed_rows:], dtype=torch.float64)
            self.spread = self.spread.add(counts.to(self.means.device, non_blocking=True),
                                          self.means[self.summed_rows:rows], self.variances[self.summed_rows:rows])
            self.summed_rows = rows
        return self.spread

    def flush(self, reuse_rows: bool = True) -> None:
        rows = len(self.counts)
        if rows == 0:
            return
        self.sum_spread()
        counts = torch.tensor(self.counts, dtype=torch.float64).to(self.means.device, non_blocking=True)
        chunk, dropped = pool_batches(counts, self.means[:rows], self.variances[:rows])
        self.moments = chunk if self.moments is None else self.moments.merge(chunk)
        self.nonfinite = dropped if self.nonfinite is None else self.nonfinite + dropped
        self.counts, self.summed_rows = [], 0
        if reuse_rows:  # momentum 1 computes 0 * old + batch: a NaN left in a row would poison its next call
            self.means.zero_()
            self.variances.zero_()

    def finish(self) -> tuple[Moments, torch.Tensor, BatchSpread]:
        """The pooled moments, the number of dropped (non-finite) calls and the spread of everything seen."""
        self.flush(reuse_rows=False)
        if self.moments is None:  # never called
            device = self.means.device
            return (Moments.empty(self.means.shape[1], device), torch.zeros((), dtype=torch.long, device=device),
                    self.spread)
        return self.moments, self.nonfinite, self.spread


def merged_spreads(spreads: list[BatchSpread], flags: torch.Tensor, world_size: int
                   ) -> tuple[list[BatchSpread], torch.Tensor]:
    """Every process's spreads merged in rank order (bit-identical on all of them), and every process's
    ``flags`` (a float64 vector), one row per rank. One all_gather carries both."""
    if world_size == 1:
        return spreads, flags[None]
    local = [pack_spread(spread) for spread in spreads]
    gathered = all_gather(torch.cat([flags, *local]), world_size)
    sizes = [flags.numel(), *(part.numel() for part in local)]
    per_rank = [vector.split(sizes) for vector in gathered]
    merged = []
    for index, spread in enumerate(spreads, start=1):
        total = BatchSpread.empty(spread.shift.numel(), spread.shift.device)
        for parts in per_rank:
            total = total.merge(unpack_spread(parts[index], spread.shift.numel()))
        merged.append(total)
    return merged, torch.stack([parts[0] for parts in per_rank])


def merge_processes(
    accumulators: dict[_BatchNorm, LayerAccumulator], seen_batches: int, seen_samples: int, world_size: int
) -> tuple[dict[_BatchNorm, LayerTotals], int, int]:
    """Each layer's totals over every process, bit-identical on all of them, and the global batch and
    sample counts. One all_gather carries everything."""
    if world_size == 1:
        finished = [accumulator.finish() for accumulator in accumulators.values()]
        nonfinite = torch.stack([n for _, n, _ in finished]).tolist()  # one synchronization for all layers
        totals = {layer: LayerTotals(moments, int(n), a.samples, a.batches, a.one_value, spread)
                  for (layer, a), (moments, _, spread), n in zip(accumulators.items(), finished, nonfinite)}
        return totals, seen_batches, seen_samples
    local = [_pack(*a.finish(), a.samples, a.batches, a.one_value) for a in accumulators.values()]
    counts = {"batches": seen_batches, "samples": seen_samples}
    header = torch.tensor([float(counts[name]) for name in _HEADER], dtype=torch.float64, device=local[0].device)
    gathered = all_gather(torch.cat([header, *local]), world_size)
    sizes = [len(_HEADER), *(part.numel() for part in local)]
    per_rank = [vector.split(sizes) for vector in gathered]  # [header, layer 0, layer 1, ...] per rank
    merged_of, scalar_rows = {}, []
    for index, layer in enumerate(accumulators, start=1):
        moments, rank_scalars = Moments.empty(layer.num_features, local[0].device), []
        spread = BatchSpread.empty(layer.num_features, local[0].device)
        for parts in per_rank:  # rank order, so every process computes the same bits
            rank_moments, scalars, rank_spread = _unpack(parts[index], layer.num_features)
            moments, spread = moments.merge(rank_moments), spread.merge(rank_spread)
            rank_scalars.append(torch.stack([scalars[name] for name in _SCALARS[1:]]))
        merged_of[layer] = (moments, spread)
        scalar_rows.append(torch.stack(rank_scalars).sum(dim=0))
    sums = torch.stack(scalar_rows).tolist()  # one synchronization for every layer's counts
    merged = {layer: LayerTotals(moments, *map(int, counts), spread)
              for (layer, (moments, spread)), counts in zip(merged_of.items(), sums)}
    summed = dict(zip(_HEADER, torch.stack([parts[0] for parts in per_rank]).sum(dim=0).tolist()))
    return merged, int(summed["batches"]), int(summed["samples"])
