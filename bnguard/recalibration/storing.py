"""Writing recalibrated statistics into the layers, all of them or none, and how far each layer moved."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .accumulator import Accumulators, Merged
from .isolation import interrupts_deferred
from .layers import side_by_side
from .report import LayerReport


def write_statistics(
    layers: list[tuple[str, _BatchNorm]], reasons: dict[str, str], merged: Merged, accumulators: Accumulators,
    bounds: dict[_BatchNorm, Callable[[], float | None]],
) -> list[LayerReport]:
    """Stores the new statistics of every layer, all or none, and reports each layer (``bounds``: each
    layer's error bound, computed when the report is first asked for it)."""
    reports: list[LayerReport] = []
    means, variances = merged.sums.pooled()  # every channel at once
    movements = iter(_movements(means, variances, accumulators))
    columns = zip(means.split(accumulators.widths), variances.split(accumulators.widths))
    updates = []
    for name, layer in layers:
        if name in reasons:
            reports.append(LayerReport(name=name, skipped=reasons[name]))
            continue
        seen, movement, (mean, variance) = merged.totals[layer], next(movements), next(columns)
        counts = {"name": name, "samples": seen.samples, "batches": seen.calls, "nonfinite_batches": seen.nonfinite,
                  "one_value_batches": seen.one_value, "error_bound": bounds[layer]}
        pooled_calls = seen.calls - seen.nonfinite
        if seen.calls == 0 or pooled_calls == 0:
            reason = "no batch with finite statistics" if seen.calls else (
                "only batches of one value per channel" if seen.one_value else "saw no input")
            reports.append(LayerReport(**counts, skipped=reason))
            continue
        updates.append((layer, mean, variance, pooled_calls))
        reports.append(LayerReport(**counts, **dict(zip(LayerReport.MOVEMENT, movement))))
    with interrupts_deferred():  # a Ctrl-C here still lets every layer be written
        _store(updates)
    return reports


def _movements(means: torch.Tensor, variances: torch.Tensor, accumulators: Accumulators) -> list[list[float]]:
    """Per recalibrated layer, how far the new statistics (``means``, ``variances``: every channel) are from
    the old: the largest and the mean over channels of |mean shift| / new std and of |log variance ratio|.
    All layers at once, one synchronization."""
    layers, index, eps = accumulators.layers, accumulators.index, accumulators.eps
    old_mean, old_var = (side_by_side([getattr(layer, name) for layer in layers], accumulators.device)
                         for name in ("running_mean", "running_var"))
    shift = (means - old_mean).abs() / (variances + eps).sqrt()
    log_ratio = ((variances + eps) / (old_var + eps)).log().abs()
    both = torch.stack([shift, log_ratio], dim=1)
    largest = both.new_zeros(len(layers), 2).scatter_reduce_(0, index[:, None].expand(-1, 2), both, "amax",
                                                             include_self=False)
    mean = both.new_zeros(len(layers), 2).index_add_(0, index, both) / torch.bincount(index)[:, None]
    return torch.stack([largest[:, 0], mean[:, 0], largest[:, 1], mean[:, 1]], dim=1).tolist()


def _store(updates: list[tuple[_BatchNorm, torch.Tensor, torch.Tensor, int]]) -> None:
    """Every layer's (layer, mean, variance, calls) into its buffers, in three multi-tensor copies (float64 to
    each buffer's dtype, rounding as .to() would)."""
    if not updates:
        return
    layers, means, variances, calls = zip(*updates)
    counters = [layer.num_batches_tracked for layer in layers]
    _copy_all([layer.running_mean for layer in layers], list(means))
    _copy_all([layer.running_var for layer in layers], list(variances))
    _copy_all(counters, list(torch.tensor(calls, dtype=counters[0].dtype).to(counters[0].device).unbind()))


def _copy_each(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    for target, source in zip(targets, sources):
        target.copy_(source)


_copy_all = getattr(torch, "_foreach_copy_", _copy_each)  # one kernel for all layers where torch has it
