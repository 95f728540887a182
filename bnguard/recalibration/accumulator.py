"""Collecting the BatchNorm layers' per-call statistics during recalibration, pooled for all layers at once,
and merging them across processes."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ..stats.batch_sums import BatchSums
from ..utils.distributed import all_gather
from .layers import channels as layer_channels


class Merged(NamedTuple):
    """What every process saw, merged: each layer's totals, the sums of all channels side by side (the
    pooled statistics and their spread), and the global batch and sample counts."""

    totals: dict[_BatchNorm, LayerTotals]
    sums: BatchSums
    batches: int
    samples: int


class LayerTotals(NamedTuple):
    """Everything one layer saw: calls left out as non-finite, samples, calls, and calls left out because
    they held one value per channel."""

    nonfinite: int
    samples: int
    calls: int
    one_value: int  # calls left out: one value per channel, which BatchNorm cannot train-normalize


# Per layer, these counts travel between processes beside the sums of all channels.
_LAYER_COUNTS = ("nonfinite", "samples", "calls", "one_value")


class LayerRows:
    """One layer's calls: each computes its batch mean and unbiased variance with BatchNorm's own kernel, at
    momentum 1, into a row of the layer's chunk, so the layer's real buffers are never touched.

    A stock BatchNorm layer runs :meth:`forward_of` in place of its forward (no hook dispatch, no momentum or
    call counter); a subclass with a forward of its own keeps it, fed by the pre-hook :meth:`before_call`.
    """

    def __init__(self, layer: _BatchNorm, rows: torch.Tensor, flush: Callable[[], None]):
        self.stats = rows  # 2 x height x channels: means, variances; possibly columns of a shared tensor
        self.height = rows.shape[1]  # rows in a chunk
        # Every row's views at once: unbind makes them in about half the time of indexing them one by one.
        self.rows = list(zip(*(half.unbind() for half in rows.unbind())))
        self.counts: list[int] = []  # elements per channel of each row written since the last flush
        self.calls: torch.Tensor | None = None  # the batch counter a layer with a forward of its own increments
        self.samples = self.batches = self.one_value = 0
        self._flush = flush
        self._statistics = (layer.running_mean, layer.running_var)  # the layer's own, read in eval mode only
        self.channels = layer_channels(layer)

    def _next_row(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The row this call writes; None for a call of one value per channel, which train mode would refuse:
        it normalizes as in eval mode, with the layer's own statistics, and is left out. (Runs at every layer
        call: plain Python on ints, no tensor operation.)"""
        elements = x.numel()
        if elements == self.channels:
            self.one_value += 1
            return None
        if len(self.counts) == self.height:  # every row written by now: pool all layers' rows
            self._flush()
        counts = self.counts
        counts.append(elements // self.channels)
        self.samples += x.shape[0]
        self.batches += 1
        return self.rows[len(counts) - 1]

    def forward_of(self, layer: _BatchNorm) -> Callable[[torch.Tensor], torch.Tensor]:
        """A stock BatchNorm forward that writes this call's statistics into its row (torch.batch_norm itself:
        the one-value check that F.batch_norm adds is :meth:`_next_row`'s)."""
        cudnn = torch.backends.cudnn.enabled  # read once: a property that asks torch at every access

        def forward(input: torch.Tensor) -> torch.Tensor:
            layer._check_input_dim(input)
            row = self._next_row(input)
            mean, var = self._statistics if row is None else row
            return torch.batch_norm(input, layer.weight, layer.bias, mean, var, row is not None, 1.0, layer.eps, cudnn)
        return forward

    def before_call(self, layer: _BatchNorm, args: tuple, kwargs: dict) -> None:
        """For a layer with a forward of its own, run at momentum 1: points its buffers at the row."""
        row = self._next_row(args[0] if args else kwargs["input"])  # bn(x) or bn(input=x)
        layer.training = row is not None  # back to train mode at the next call after a one-value one
        # Direct dict access: this runs before every layer call, and the names are plain buffers.
        layer._buffers["running_mean"], layer._buffers["running_var"] = self._statistics if row is None else row
        if row is not None:
            if self.calls is None:
                self.calls = torch.zeros((), dtype=torch.long, device=layer.running_mean.device)
            layer._buffers["num_batches_tracked"] = self.calls
        return None


class Accumulators:
    """The per-call statistics of every recalibrated layer, collected with no device synchronization and
    pooled for all layers' channels side by side into one :class:`BatchSums` (float64 sums that give the
    pooled statistics and their spread), whatever the number of layers, in a few dozen tensor operations per
    chunk of calls: :attr:`chunk` rows per layer, fewer where fewer calls are expected (``expected_calls``,
    the batches to come), as every row costs its making."""

    chunk = 64

    def __init__(self, layers: list[_BatchNorm], expected_calls: int | None = None):
        self.layers = layers
        height = self.chunk if expected_calls is None else max(1, min(self.chunk, expected_calls))
        buffer = layers[0].running_mean
        self.device = buffer.device
        self.widths = [layer_channels(layer) for layer in layers]  # channels of each layer
        self.bounds = [0, *itertools.accumulate(self.widths)]
        channels = self.bounds[-1]
        # Each channel's layer.
        self.host_index = torch.repeat_interleave(torch.arange(len(layers)), torch.tensor(self.widths))
        self.index = self.host_index.to(self.device)
        self.eps = torch.tensor([layer.eps for layer in layers], dtype=torch.float64, device=self.device)[self.index]
        # Layers alike in dtype and device write into columns of one shared tensor: pooled as they are.
        self.shared = all(layer.running_mean.dtype == buffer.dtype and layer.running_mean.device == self.device
                          for layer in layers)
        if self.shared:
            self.stats = torch.zeros(2, height, channels, dtype=buffer.dtype, device=self.device)  # means, vars
            columns = self.stats.split(self.widths, dim=2)
        else:
            self.stats = None
            columns = [torch.zeros(2, height, width, dtype=layer.running_mean.dtype,
                                   device=layer.running_mean.device) for layer, width in zip(layers, self.widths)]
        self.of = {layer: LayerRows(layer, rows, self.flush) for layer, rows in zip(layers, columns)}
        self.nonfinite = torch.zeros(len(layers), dtype=torch.long, device=self.device)
        self.sums = BatchSums.empty(channels, self.device)

    def _rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rows written since the last flush, all layers side by side: each entry's count (R x C, 0 where
        the layer was not called or its call was not finite), means and variances (R x C, float64), and
        each layer's calls left out as non-finite (L)."""
        rows = list(self.of.values())
        height = max(len(r.counts) for r in rows)
        counts = torch.tensor([r.counts + [0] * (height - len(r.counts)) for r in rows], dtype=torch.float64)
        counts = counts.to(self.device, non_blocking=True).t()
        if self.shared:
            stats = self.stats[:, :height].double()
        else:
            stats = torch.cat([r.stats[:, :height].to(self.device, torch.float64) for r in rows], dim=2)
        # A call is non-finite where the float64 sum of its layer's means and variances is (no overflow there).
        sums = torch.zeros(height, len(rows), dtype=torch.float64, device=self.device).index_add_(
            1, self.index, stats.sum(dim=0))
        bad = ~torch.isfinite(sums) & (counts > 0)
        # gather, not index_select: along dim 1, index_select copies element by element (6x slower on resnet18)
        counts = torch.where(bad, 0.0, counts).gather(1, self.index.expand(height, -1))
        return counts, stats[0], stats[1], bad.sum(0)

    @property
    def pending(self) -> bool:
        """Whether any layer has rows written since the last flush."""
        return any(rows.counts for rows in self.of.values())

    def flush(self, final: bool = False) -> None:
        """Adds every row written so far to the sums, and clears the rows for the next calls; ``final``: the
        passes are over, and the rows' memory is given back instead."""
        if self.pending:
            counts, means, variances, dropped = self._rows()
            self.sums = self.sums.add(counts, means, variances)
            self.nonfinite += dropped
        for rows in self.of.values():
            rows.counts = []
            if final:
                rows.stats, rows.rows = None, []
        if final:
            self.stats = None
        else:  # momentum 1 computes 0 * old + batch: a NaN left in a row would poison its next call
            for tensor in [self.stats] if self.shared else [rows.stats for rows in self.of.values()]:
                tensor.zero_()

    def current_sums(self) -> BatchSums:
        """The sums of every call so far, the rows not yet pooled included."""
        if not self.pending:
            return self.sums
        counts, means, variances, _ = self._rows()
        return self.sums.add(counts, means, variances)

    def counts(self) -> torch.Tensor:
        """Per layer, this process's :data:`_LAYER_COUNTS` (L x 4, float64)."""
        host = torch.tensor([[rows.samples, rows.batches, rows.one_value] for rows in self.of.values()],
                            dtype=torch.float64).to(self.device, non_blocking=True)
        return torch.cat([self.nonfinite.double()[:, None], host], dim=1)


def merged_sums(sums: BatchSums, flags: torch.Tensor, world_size: int) -> tuple[BatchSums, torch.Tensor]:
    """Every process's sums merged in rank order (bit-identical on all of them), and every process's
    ``flags`` (a float64 vector), one row per rank. One all_gather carries both."""
    if world_size == 1:
        return sums, flags[None]
    gathered = all_gather(torch.cat([flags, sums.packed()]), world_size)
    merged = BatchSums.empty(sums.shift.numel(), sums.shift.device)
    for vector in gathered:
        merged = merged.merge(BatchSums.unpacked(vector[flags.numel():], sums.shift.numel()))
    return merged, torch.stack([vector[:flags.numel()] for vector in gathered])


def merge_processes(accumulators: Accumulators, seen_batches: int, seen_samples: int, world_size: int) -> Merged:
    """Everything every process saw, bit-identical on all of them. One all_gather carries it."""
    accumulators.flush(final=True)
    sums, counts = accumulators.sums, accumulators.counts()
    header = torch.tensor([seen_batches, seen_samples], dtype=torch.float64, device=accumulators.device)
    if world_size > 1:
        local = [header, counts.flatten(), sums.packed()]
        gathered = all_gather(torch.cat(local), world_size)
        channels = sums.shift.numel()
        sums = BatchSums.empty(channels, accumulators.device)
        header, counts = torch.zeros_like(header), torch.zeros_like(counts)
        for vector in gathered:  # rank order, so every process computes the same bits
            parts = vector.split([part.numel() for part in local])
            header, counts = header + parts[0], counts + parts[1].reshape(counts.shape)
            sums = sums.merge(BatchSums.unpacked(parts[2], channels))
    figures = torch.cat([header, counts.flatten()]).tolist()  # one synchronization for every layer's counts
    totals = {layer: LayerTotals(*map(int, figures[2 + 4 * i: 6 + 4 * i]))
              for i, layer in enumerate(accumulators.layers)}
    return Merged(totals, sums, int(figures[0]), int(figures[1]))
