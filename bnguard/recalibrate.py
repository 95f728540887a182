"""Re-estimating BatchNorm running statistics for the current weights ("precise BN")."""

from __future__ import annotations

import sys
import time
import types
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from typing import Any, Iterator, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import SyncBatchNorm, _BatchNorm
from tqdm.auto import tqdm

from .distributed import all_gather, process_info, split_budget
from .layers import batchnorm_layers, is_uninitialized, tracks_statistics, unwrap_model
from .report import LayerReport, RecalibrationReport
from .stats import Moments, pool_batches

Forward = Callable[[nn.Module, Any], Any]
LayerSelection = Union[Iterable[nn.Module], Callable[[str, nn.Module], bool]]


def default_forward(model: nn.Module, batch: Any) -> Any:
    """A tensor is the input; a tuple/list's first element is; a mapping is passed as keyword arguments."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


@torch.no_grad()
def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    num_samples: int | None = None,
    num_batches: int | None = None,
    forward: Forward | None = None,
    accelerator: Any = None,
    modules: LayerSelection | None = None,
    progress: bool = True,
) -> RecalibrationReport:
    """Re-estimates ``running_mean`` / ``running_var`` of the model's BatchNorm layers for its current weights.

    Runs ``forward(model, batch)`` without gradients over ``batches`` (default: :func:`default_forward`, with
    tensors moved to the model's device) and stores in every recalibrated layer the exact pooled statistics
    of all the elements it saw: the count-weighted mean and the unbiased variance of their union, spread of
    the batch means included, merged in float64. Returns a :class:`RecalibrationReport`.

    1. Only the recalibrated BatchNorm layers are in train mode during the passes; every other module keeps
       its mode, so dropout stays on in a model left in train mode. Afterwards modes, momenta, hooks,
       parameters, gradients, optimizer state and the torch RNG state are exactly as before.
    2. Atomic: the buffers are not touched until every pass (and the cross-process merge) has succeeded. An
       exception, KeyboardInterrupt included, leaves them bit-identical and propagates.
    3. ``num_batches_tracked`` of a recalibrated layer afterwards holds the number of layer calls pooled into
       its statistics (over all processes), so a ``momentum=None`` layer that keeps training weighs the
       estimate as that many batches.
    4. ``num_samples`` / ``num_batches`` are global budgets, shared out between processes; iteration stops at
       whichever is reached first, the batch that reaches ``num_samples`` being used whole.
    5. Distributed (``accelerator`` given, or a process group initialized): each process runs its own batches
       and the per-layer statistics are merged exactly in rank order, so every rank ends with bit-identical
       buffers. Every process must call this; an exception on one rank leaves the others waiting in the merge.
       SyncBatchNorm layers normalize with per-process batch statistics during the passes.
    6. Skipped, with the reason in the report: layers with ``track_running_stats=False``, uninitialized lazy
       layers (the forward passes initialize them as any forward would), layers left out by ``modules`` (an
       iterable of layers, or a ``(name, layer) -> bool`` filter), and layers that saw no input. A layer
       called more than once per forward pools every call. A batch whose statistics are not finite is left
       out for that layer and counted; a layer with no finite batch keeps its old statistics.
    7. Under autocast the statistics come from BatchNorm's own kernel, which computes them in float32 for
       half-precision inputs (in float64 accumulation on the CPU).
    """
    for name, value in (("num_samples", num_samples), ("num_batches", num_batches)):
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be a positive number of {name[4:]} or None, got {value}")
    started = time.perf_counter()
    rank, world_size = process_info(accelerator)
    inner = unwrap_model(model)
    layers = list(batchnorm_layers(inner))
    if not layers:
        warnings.warn(f"{type(inner).__name__} has no BatchNorm layer: nothing to recalibrate", stacklevel=2)
        return RecalibrationReport()

    reasons = _skip_reasons(layers, modules)
    targets = {layer: _LayerAccumulator(layer) for name, layer in layers if name not in reasons}
    if not targets:
        return RecalibrationReport([LayerReport(name, skipped=reasons[name]) for name, _ in layers])

    device = next(iter(targets)).running_mean.device
    if forward is None:
        forward = lambda module, batch: default_forward(module, to_device(batch, device))  # noqa: E731
    bar = tqdm(
        desc="recalibrating BatchNorm",
        unit="batch",
        total=_expected_batches(batches, split_budget(num_batches, rank, world_size)),
        disable=not (progress and rank == 0 and sys.stderr.isatty()),
        leave=False,
    )
    with bar, _passes(inner, layers, targets):
        seen_batches, seen_samples = _run_passes(
            inner,
            batches,
            forward,
            split_budget(num_batches, rank, world_size),
            split_budget(num_samples, rank, world_size),
            bar,
        )
        pooled, total_batches, total_samples = _merge_processes(
            targets, seen_batches, seen_samples, world_size
        )
    if total_batches == 0:
        raise ValueError("batches is empty: recalibration needs at least one batch of training data")
    report = _write_statistics(layers, reasons, targets, pooled)
    _warn_nonfinite(report)
    return RecalibrationReport(report, total_batches, total_samples, time.perf_counter() - started)


class _LayerAccumulator:
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

    def before_call(self, layer: _BatchNorm, args: tuple) -> None:
        """Counts the call's elements and points the layer's buffers at the row the call will write."""
        if len(self.counts) == self.chunk:  # every row written by now: pool them, free the rows
            self.flush()
        x = args[0]
        self.counts.append(x.numel() // layer.num_features)
        self.samples += x.shape[0]
        self.batches += 1
        row = len(self.counts) - 1
        if row == len(self.rows):
            self.rows.append((self.means[row], self.variances[row]))
        # Direct dict access: this runs before every layer call, and the names are plain buffers.
        layer._buffers["running_mean"], layer._buffers["running_var"] = self.rows[row]
        layer._buffers["num_batches_tracked"] = self.calls

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

    def flat(self) -> torch.Tensor:
        """count, dropped batches, samples, calls, mean, M2 as one float64 vector, for the process merge."""
        moments, nonfinite = self.finish()
        head = torch.stack([moments.count, nonfinite.double()])
        sizes = torch.tensor([self.samples, self.batches], dtype=torch.float64, device=head.device)
        return torch.cat([head, sizes, moments.mean, moments.m2])


def _skip_reasons(layers: list[tuple[str, _BatchNorm]], modules: LayerSelection | None) -> dict[str, str]:
    if modules is None:
        chosen = None
    elif callable(modules) and not isinstance(modules, nn.Module):
        chosen = {id(layer) for name, layer in layers if modules(name, layer)}
    else:
        selection = list(modules)
        foreign = [m for m in selection if not isinstance(m, _BatchNorm)]
        if foreign:
            raise ValueError(
                f"modules must select BatchNorm layers of the model, got {type(foreign[0]).__name__}; "
                "pass the layers themselves or a (name, layer) -> bool filter"
            )
        chosen = {id(m) for m in selection}
    reasons = {}
    for name, layer in layers:
        if not tracks_statistics(layer):
            reasons[name] = "track_running_stats=False"
        elif is_uninitialized(layer):
            reasons[name] = "uninitialized lazy layer"
        elif chosen is not None and id(layer) not in chosen:
            reasons[name] = "excluded"
    return reasons


@contextmanager
def _passes(model: nn.Module, layers: list[tuple[str, _BatchNorm]], targets: dict) -> Iterator[None]:
    """Puts the model in recalibration state and restores every piece of it, whatever happens."""
    modes = [(module, module.training) for module in model.modules()]
    saved = {layer: dict(layer._buffers) for _, layer in layers if tracks_statistics(layer)}
    momenta = {layer: layer.momentum for layer in targets}
    own_forward = {layer: layer.__dict__.get("forward") for layer in targets}
    rng_cpu = torch.get_rng_state()
    rng_cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    handles = []
    try:
        for layer in saved:
            if layer not in targets and not is_uninitialized(layer):
                # A layer left out may still be in train mode: let it update copies, not its buffers.
                layer._buffers.update({k: v.clone() if v is not None else None for k, v in saved[layer].items()})
        for layer, accumulator in targets.items():
            layer.training = True
            layer.momentum = 1.0
            if isinstance(layer, SyncBatchNorm):
                # Per-process statistics, merged exactly afterwards, and no CPU refusal under gloo.
                layer.forward = types.MethodType(_BatchNorm.forward, layer)
            handles.append(layer.register_forward_pre_hook(accumulator.before_call))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer, buffers in saved.items():
            layer._buffers.update(buffers)
        for layer, momentum in momenta.items():
            layer.momentum = momentum
        for layer, method in own_forward.items():
            if method is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = method
        for module, training in modes:
            module.training = training
        torch.set_rng_state(rng_cpu)
        if rng_cuda is not None:
            torch.cuda.set_rng_state_all(rng_cuda)


def _run_passes(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Forward,
    batch_budget: int | None,
    sample_budget: int | None,
    bar: tqdm,
) -> tuple[int, int]:
    seen_batches = seen_samples = 0
    iterator = iter(batches)
    while (batch_budget is None or seen_batches < batch_budget) and (
        sample_budget is None or seen_samples < sample_budget
    ):
        try:
            batch = next(iterator)
        except StopIteration:
            break
        forward(model, batch)
        seen_batches += 1
        seen_samples += _batch_size(batch, required=sample_budget is not None)
        bar.update()
    return seen_batches, seen_samples


def _merge_processes(
    targets: dict, seen_batches: int, seen_samples: int, world_size: int
) -> tuple[dict, int, int]:
    """Per layer (moments, non-finite batches, samples, calls), identical on every process, and the global
    batch and sample counts."""
    accumulators = list(targets.values())
    if world_size == 1:
        finished = [accumulator.finish() for accumulator in accumulators]
        dropped = torch.stack([n for _, n in finished]).tolist()  # one synchronization for all layers
        pooled = {layer: (moments, int(n), a.samples, a.batches)
                  for layer, a, (moments, _), n in zip(targets, accumulators, finished, dropped)}
        return pooled, seen_batches, seen_samples
    local = [accumulator.flat() for accumulator in accumulators]
    sizes = [part.numel() for part in local]
    header = torch.tensor([seen_batches, seen_samples], dtype=torch.float64, device=local[0].device)
    parts = all_gather(torch.cat([header, *local]), world_size)
    per_layer = list(zip(*(p[2:].split(sizes) for p in parts)))  # for each layer, every rank's vector
    totals = torch.stack([torch.stack(chunks)[:, 1:4].sum(dim=0) for chunks in per_layer]).tolist()
    pooled = {}
    for layer, chunks, (dropped, samples, calls) in zip(targets, per_layer, totals):
        channels = layer.num_features
        moments = Moments.empty(channels, chunks[0].device)
        for chunk in chunks:  # rank order, so every process computes the same bits
            moments = moments.merge(Moments(chunk[0], chunk[4 : 4 + channels], chunk[4 + channels :]))
        pooled[layer] = (moments, int(dropped), int(samples), int(calls))
    batches, samples = torch.stack([p[:2] for p in parts]).sum(dim=0).tolist()
    return pooled, int(batches), int(samples)


def _write_statistics(
    layers: list[tuple[str, _BatchNorm]], reasons: dict[str, str], targets: dict, pooled: dict
) -> list[LayerReport]:
    reports: list[LayerReport | None] = []
    movements, written = [], []
    for name, layer in layers:
        if name in reasons:
            reports.append(LayerReport(name, skipped=reasons[name]))
            continue
        moments, nonfinite, samples, calls = pooled[layer]
        pooled_calls = calls - nonfinite
        if calls == 0 or pooled_calls == 0:
            reason = "saw no input" if calls == 0 else "no batch with finite statistics"
            reports.append(LayerReport(name, samples, calls, nonfinite, skipped=reason))
            continue
        new_mean, new_var = moments.mean, moments.variance(unbiased=True)
        old_mean, old_var = layer.running_mean.double(), layer.running_var.double()
        shift = (new_mean - old_mean).abs() / (new_var + layer.eps).sqrt()
        log_ratio = ((new_var + layer.eps) / (old_var + layer.eps)).log().abs()
        layer.running_mean.copy_(new_mean)
        layer.running_var.copy_(new_var)
        layer.num_batches_tracked.fill_(pooled_calls)
        movements.append(torch.stack([shift.max(), shift.mean(), log_ratio.max(), log_ratio.mean()]))
        written.append((len(reports), (name, samples, calls, nonfinite)))
        reports.append(None)
    if movements:  # one synchronization for every layer's numbers
        for (index, fields), movement in zip(written, torch.stack(movements).tolist()):
            reports[index] = LayerReport(*fields, *movement)
    return reports  # type: ignore[return-value]


def _warn_nonfinite(layers: list[LayerReport]) -> None:
    affected = [layer for layer in layers if layer.nonfinite_batches]
    if affected:
        worst = max(affected, key=lambda layer: layer.nonfinite_batches)
        warnings.warn(
            f"{len(affected)} BatchNorm layer(s) saw batches with non-finite statistics (NaN/Inf input), "
            f"left out of the estimate: up to {worst.nonfinite_batches} batch(es), at {worst.name!r}",
            stacklevel=3,
        )


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors in a batch (nested in tuples, lists, dicts) moved to `device`; anything else as is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


def _batch_size(batch: Any, required: bool) -> int:
    """Samples in a batch: the leading size of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for value in values:
        size = _batch_size(value, required=False)
        if size:
            return size
    if required:
        raise TypeError(
            f"num_samples needs batches holding a tensor to count samples in, got {type(batch).__name__}; "
            "use num_batches instead"
        )
    return 0


def _expected_batches(batches: Iterable[Any], budget: int | None) -> int | None:
    try:
        length = len(batches)  # type: ignore[arg-type]
    except TypeError:
        return budget
    return length if budget is None else min(length, budget)


__all__ = ["recalibrate", "default_forward"]
