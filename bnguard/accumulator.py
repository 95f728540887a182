"""Collecting each BatchNorm layer's per-call statistics during recalibration, and merging them across
processes."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .distributed import all_gather
from .stats import Moments, pool_batches


class LayerTotals(NamedTuple):
    """Everything one layer saw: pooled moments, calls left out as non-finite, samples, calls, and calls
    left out because they held one value per channel."""

    moments: Moments
    nonfinite: int
    samples: int
    calls: int
    one_value: int  # calls left out: one value per channel, which BatchNorm cannot train-normalize


# One layer's totals travel between processes as a float64 vector: these scalars, then mean and M2.
_SCALARS = ("count", "nonfinite", "samples", "calls", "one_value")
# The gathered vector of one process starts with its global counts.
_HEADER = ("batches", "samples")


def _pack(moments: Moments, nonfinite: torch.Tensor, samples: int, calls: int, one_value: int) -> torch.Tensor:
    device = moments.mean.device
    host = {"samples": samples, "calls": calls, "one_value": one_value}
    scalars = {"count": moments.count, "nonfinite": nonfinite.double(),
               **{name: torch.tensor(float(value), dtype=torch.float64, device=device) for name, value in host.items()}}
    return torch.cat([torch.stack([scalars[name] for name in _SCALARS]), moments.mean, moments.m2])


def _unpack(vector: torch.Tensor, channels: int) -> tuple[Moments, dict[str, torch.Tensor]]:
    head, mean, m2 = vector.split([len(_SCALARS), channels, channels])
    scalars = dict(zip(_SCALARS, head))
    return Moments(scalars["count"], mean, m2), scalars


class LayerAccumulator:
    """Collects one layer's per-call batch statistics with no device synchronization.

    During the passes the layer runs with momentum 1, so its running buffers receive exactly each call's
    batch mean and unbiased variance from BatchNorm's own kernel. The buffers it writes are rows of this
    object's chunk tensors, swapped in by a pre-hook before each call, so the layer's real buffers are never
    touched; full chunks are pooled into float64 moments.
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
        self.samples = 0
        self.batches = 0
        self.one_value = 0
        self._statistics = (layer.running_mean, layer.running_var)  # the layer's own, read in eval mode only

    def before_call(self, layer: _BatchNorm, args: tuple, kwargs: dict) -> None:
        """Counts the call's elements and points the layer's buffers at the row the call will write."""
        x = args[0] if args else kwargs["input"]  # bn(x) or bn(input=x)
        if x.numel() == layer.num_features:  # one value per channel: train mode would raise, so this call
            self.one_value += 1  # normalizes as in eval mode, with the layer's own statistics, and is left out
            layer.training = False  # back to train mode at its next call, or when the passes end
            layer._buffers["running_mean"], layer._buffers["running_var"] = self._statistics
            return None
        if not layer.training:  # after a one-value call
            layer.training = True
        if len(self.counts) == self.chunk:  # every row written by now: pool them, free the rows
            self.flush()
        self.counts.append(x.numel() // layer.num_features)
        self.samples += x.shape[0]
        self.batches += 1
        row = len(self.counts) - 1
        if row == len(self.rows):
            self.rows.append((self.means[row], self.variances[row]))
        # Direct dict access: this runs before every layer call, and the names are plain buffers.
        layer._buffers["running_mean"], layer._buffers["running_var"] = self.rows[row]
        layer._buffers["num_batches_tracked"] = self.calls
        return None

    def flush(self, reuse_rows: bool = True) -> None:
        rows = len(self.counts)
        if rows == 0:
            return
        counts = torch.tensor(self.counts, dtype=torch.float64).to(self.means.device, non_blocking=True)
        chunk, dropped = pool_batches(counts, self.means[:rows], self.variances[:rows])
        self.moments = chunk if self.moments is None else self.moments.merge(chunk)
        self.nonfinite = dropped if self.nonfinite is None else self.nonfinite + dropped
        self.counts = []
        if reuse_rows:  # momentum 1 computes 0 * old + batch: a NaN left in a row would poison its next call
            self.means.zero_()
            self.variances.zero_()

    def finish(self) -> tuple[Moments, torch.Tensor]:
        """The pooled moments and the number of dropped (non-finite) calls of everything seen."""
        self.flush(reuse_rows=False)
        if self.moments is None:  # never called
            device = self.means.device
            return Moments.empty(self.means.shape[1], device), torch.zeros((), dtype=torch.long, device=device)
        return self.moments, self.nonfinite


def merge_processes(
    accumulators: dict[_BatchNorm, LayerAccumulator], seen_batches: int, seen_samples: int, world_size: int
) -> tuple[dict[_BatchNorm, LayerTotals], int, int]:
    """Each layer's totals over every process, bit-identical on all of them, and the global batch and
    sample counts. One all_gather carries everything."""
    if world_size == 1:
        finished = [accumulator.finish() for accumulator in accumulators.values()]
        nonfinite = torch.stack([n for _, n in finished]).tolist()  # one synchronization for all layers
        totals = {layer: LayerTotals(moments, int(n), a.samples, a.batches, a.one_value)
                  for (layer, a), (moments, _), n in zip(accumulators.items(), finished, nonfinite)}
        return totals, seen_batches, seen_samples
    local = [_pack(*a.finish(), a.samples, a.batches, a.one_value) for a in accumulators.values()]
    counts = {"batches": seen_batches, "samples": seen_samples}
    header = torch.tensor([float(counts[name]) for name in _HEADER], dtype=torch.float64, device=local[0].device)
    gathered = all_gather(torch.cat([header, *local]), world_size)
    sizes = [len(_HEADER), *(part.numel() for part in local)]
    per_rank = [vector.split(sizes) for vector in gathered]  # [header, layer 0, layer 1, ...] per rank
    moments_of, scalar_rows = {}, []
    for index, layer in enumerate(accumulators, start=1):
        moments, rank_scalars = Moments.empty(layer.num_features, local[0].device), []
        for parts in per_rank:  # rank order, so every process computes the same bits
            rank_moments, scalars = _unpack(parts[index], layer.num_features)
            moments = moments.merge(rank_moments)
            rank_scalars.append(torch.stack([scalars[name] for name in LayerTotals._fields[1:]]))
        moments_of[layer] = moments
        scalar_rows.append(torch.stack(rank_scalars).sum(dim=0))
    sums = torch.stack(scalar_rows).tolist()  # one synchronization for every layer's counts
    merged = {layer: LayerTotals(moments, *map(int, counts))
              for (layer, moments), counts in zip(moments_of.items(), sums)}
    summed = dict(zip(_HEADER, torch.stack([parts[0] for parts in per_rank]).sum(dim=0).tolist()))
    return merged, int(summed["batches"]), int(summed["samples"])
