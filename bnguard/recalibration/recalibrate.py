"""Re-estimating BatchNorm running statistics for the current weights ("precise BN")."""

from __future__ import annotations

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

from ..utils.console import show_progress
from ..utils.distributed import process_info, split_budget
from ..utils.validation import fraction, positive_int
from .accumulator import Accumulators, merge_processes
from .batches import Forward, batch_size, default_forward, to_device
from .isolation import batchnorm_in_train_mode, interrupts_deferred, raise_if_interrupted
from .layers import is_uninitialized, on_meta_device, tracks_statistics, unwrap_model
from .report import LayerReport, RecalibrationReport, warn_instance_norm, warn_left_out, warn_ordered
from .stopping import END_OF_DATA, TOLERANCE_MET, ErrorBounds
from .storing import write_statistics

LayerSelection = Union[Iterable[nn.Module], Callable[[str, nn.Module], bool]]


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    tolerance: float | None = None,
    num_samples: int | None = None,
    num_batches: int | None = None,
    forward: Forward | None = None,
    accelerator: Any = None,
    modules: LayerSelection | None = None,
    frozen: Iterable[nn.Module] | None = None,
    include_frozen: bool = False,
    keep_modes: bool = False,
    progress: bool = True,
) -> RecalibrationReport:
    """Re-estimates ``running_mean`` / ``running_var`` of the model's BatchNorm layers for its current weights.

    Runs ``forward(model, batch)`` without gradients over ``batches`` (default: :func:`default_forward`, with
    tensors moved to the model's device) and stores in every recalibrated layer the exact pooled statistics
    of all the elements it saw: the count-weighted mean and the unbiased variance of their union, spread of
    the batch means included, merged in float64. Returns a :class:`RecalibrationReport`.

    1. The statistics are those of the inputs each layer gets in eval mode, which is where running
       statistics are used: during the passes only the recalibrated BatchNorm layers are in train mode and
       every other module is in eval mode (no dropout, no stochastic depth). ``keep_modes=True`` leaves
       every other module in the mode it has instead. Afterwards modes, momenta, hooks, parameters,
       gradients, optimizer state and the global random states are exactly as before.
    2. Atomic: the buffers are not touched until every pass (and the cross-process merge) has succeeded. An
       exception, KeyboardInterrupt included, leaves them bit-identical and propagates. A Ctrl-C stops the
       passes between batches, and waits while modes, momenta and hooks are restored or buffers written.
    3. ``num_batches_tracked`` of a recalibrated layer afterwards holds the number of layer calls pooled into
       its statistics (over all processes), so a ``momentum=None`` layer that keeps training weighs the
       estimate as that many batches.
    4. ``tolerance``: iteration stops as soon as every layer's estimated error bound is within it (checked
       after 4 batches, every second batch up to 16, then every eighth of the batches seen). The bound of a
       layer is the largest over its channels of |mean error| / sqrt(var + eps) and |variance error| /
       (var + eps) against the statistics of unlimited data, at 95% confidence for all channels together,
       estimated from the spread between batches; it assumes batches drawn at random (a shuffled loader)
       and warns when they look ordered. The report gives every layer's bound, the largest, and why
       iteration stopped; the bounds are computed when first read (2 to 3 ms for a resnet18).
       ``num_samples`` / ``num_batches`` are global caps, shared out between processes; iteration stops at
       whichever comes first, the batch that reaches ``num_samples`` being used whole.
    5. Distributed (``accelerator`` given, or a process group initialized): each process runs its own batches
       and the per-layer statistics are merged exactly in rank order, so every rank ends with bit-identical
       buffers. Every process must call this; an exception on one rank leaves the others waiting in the merge.
       SyncBatchNorm layers normalize with per-process batch statistics during the passes.
    6. Skipped, with the reason in the report, and left bit-identical: layers with
       ``track_running_stats=False``, uninitialized lazy layers (the forward passes initialize them as any
       forward would), layers left out by ``modules`` (an iterable of layers, or a ``(name, layer) -> bool``
       filter), layers that saw no input, and frozen layers, unless ``include_frozen=True``: those given as
       ``frozen``, or by default the BatchNorm layers in eval mode in a model in train mode (the fine-tuning
       idiom). A layer
       called more than once per forward pools every call. A batch whose statistics are not finite is left
       out for that layer and counted; a layer with no finite batch keeps its old statistics.
    7. Exact means exact given each call's batch mean and variance, which come from BatchNorm's own kernel
       in float32 (also for half-precision inputs under autocast; float64 accumulation on the CPU). For
       inputs whose |mean| is far above their spread that rounding grows: with batches of 8, the variance
       was off by 2e-6 relative at |mean| / std = 190, 1.4e-5 at 2,000 and 2.9e-4 at 20,000
       (``benchmarks/precision.py``; about 1e-7 below 10). InstanceNorm layers that keep running
       statistics are not recalibrated (a warning names them).
    8. Everything ``batches`` yields is pooled. A loader prepared by Accelerate (with ``even_batches``, its
       default) fills the last batch of every process with samples repeated from the start of the dataset:
       those count too, e.g. 16 samples pooled for 13 in batches of 4 on 2 processes. Pass
       :class:`~bnguard.TrainingBatches` to draw every sample at most once.
    """
    if isinstance(batches, torch.Tensor):
        raise TypeError("batches is one tensor, which would be iterated sample by sample: pass an iterable of "
                        "batches, e.g. [tensor] or a DataLoader")
    tolerance = fraction("tolerance", tolerance, optional=True)
    num_samples = positive_int("num_samples", num_samples, optional=True)
    num_batches = positive_int("num_batches", num_batches, optional=True)
    started = time.perf_counter()
    rank, world_size = process_info(accelerator)
    inner = unwrap_model(model)
    named = list(inner.named_modules())  # walked once: the model's tree is read three times here
    if on_meta_device(module for _, module in named):
        raise ValueError("the model is on the meta device (its tensors hold no data): materialize it, e.g. with "
                         "model.to_empty(device=...) and its weights loaded, before recalibrating")
    warn_instance_norm(named)
    layers = [(name, module) for name, module in named if isinstance(module, _BatchNorm)]
    if not layers:
        warnings.warn(f"{type(inner).__name__} has no BatchNorm layer: nothing to recalibrate", stacklevel=2)
        return RecalibrationReport()

    if include_frozen:
        frozen = ()
    elif frozen is None:
        frozen = [layer for _, layer in layers if inner.training and not layer.training]
    reasons = _skip_reasons(layers, modules, {id(layer) for layer in frozen})
    chosen = [layer for name, layer in layers if name not in reasons]
    if not chosen:
        if modules is not None and "excluded" in reasons.values():
            warnings.warn(f"modules= selects none of the model's {len(layers)} BatchNorm layers: nothing "
                          "recalibrated", stacklevel=2)
        return RecalibrationReport([LayerReport(name=name, skipped=reasons[name]) for name, _ in layers])

    batch_budget = split_budget(num_batches, rank, world_size)
    expected = _expected_batches(batches, batch_budget)
    accumulators = Accumulators(chosen, expected)
    device = accumulators.device
    if forward is None:
        forward = lambda module, batch: _forward_naming_keys(module, to_device(batch, device))  # noqa: E731
    bar = tqdm(desc="recalibrating BatchNorm", unit="batch", total=expected,
               disable=not show_progress(progress, rank == 0), leave=False)
    bounds = ErrorBounds(accumulators, world_size, tolerance)
    with bar, _passes(inner, accumulators, keep_modes), torch.no_grad():
        seen_batches, seen_samples, met_tolerance = _run_passes(
            inner, batches, forward, (batch_budget, split_budget(num_samples, rank, world_size)), bar,
            bounds if tolerance is not None else None,
        )
        merged = merge_processes(accumulators, seen_batches, seen_samples, world_size)
    all_batches, all_samples = merged.batches, merged.samples
    if all_batches == 0:
        raise ValueError("batches is empty: recalibration needs at least one batch of training data")
    report = write_statistics(layers, reasons, merged, accumulators, dict(zip(chosen, bounds.deferred(merged.sums))))
    warn_left_out(report)
    warn_ordered([chosen[i] for i in bounds.ordered(merged.sums)], inner)
    stopped = _stop_reason(met_tolerance, (num_batches, all_batches), (num_samples, all_samples))
    return RecalibrationReport(layers=report, batches=all_batches, samples=all_samples,
                               seconds=time.perf_counter() - started, tolerance=tolerance, stopped=stopped)


def _stop_reason(met_tolerance: bool, batches: tuple[int | None, int], samples: tuple[int | None, int]) -> str:
    """Why the passes ended, in the report's words: ``batches`` and ``samples`` are (budget, seen)."""
    if met_tolerance:
        return TOLERANCE_MET
    for name, (budget, seen) in (("num_batches", batches), ("num_samples", samples)):
        if budget is not None and seen >= budget:
            return f"{name} reached"
    return END_OF_DATA


def _skip_reasons(layers: list[tuple[str, _BatchNorm]], modules: LayerSelection | None,
                  frozen: set[int]) -> dict[str, str]:
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
        elif id(layer) in frozen:
            reasons[name] = "frozen: its statistics were not updating in training (include_frozen=True)"
    return reasons


_STOCK_FORWARDS = (_BatchNorm.forward, SyncBatchNorm.forward)


@contextmanager
def _passes(model: nn.Module, accumulators: Accumulators, keep_modes: bool) -> Iterator[None]:
    """The recalibrated layers in train mode at momentum 1, each feeding its accumulator, the rest in eval
    mode unless ``keep_modes``; every change, and every buffer, restored whatever happens."""
    momenta = {layer: layer.momentum for layer in accumulators.layers}
    own_forward = {layer: layer.__dict__.get("forward") for layer in accumulators.layers}
    stock = [layer for layer in accumulators.layers
             if own_forward[layer] is None and type(layer).forward in _STOCK_FORWARDS]
    handles = []
    # Deferred before the try: a layer left with its accumulator's forward or pre-hook would corrupt training.
    with batchnorm_in_train_mode(model, accumulators.layers, others_eval=not keep_modes, never_written=stock), \
            interrupts_deferred():
        try:
            for layer, rows in accumulators.of.items():
                if layer in stock:
                    # SyncBatchNorm too: per-process statistics, merged exactly afterwards, no gloo refusal.
                    layer.forward = rows.forward_of(layer)
                    continue
                layer.momentum = 1.0
                if isinstance(layer, SyncBatchNorm):
                    layer.forward = types.MethodType(_BatchNorm.forward, layer)
                handles.append(layer.register_forward_pre_hook(rows.before_call, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for layer, momentum in momenta.items():
                if layer.momentum != momentum:  # only the layers fed by a pre-hook ran at momentum 1
                    layer.momentum = momentum
            for layer, method in own_forward.items():
                if method is None:
                    layer.__dict__.pop("forward", None)
                else:
                    layer.forward = method


def _run_passes(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Forward,
    budgets: tuple[int | None, int | None],
    bar: tqdm,
    bounds: ErrorBounds | None,
) -> tuple[int, int, bool]:
    """Runs this process's batches until a cap, the end of its data or, with ``bounds``, the tolerance on
    every process; returns its batch and sample counts and whether the tolerance was met."""
    batch_budget, sample_budget = budgets
    seen_batches = seen_samples = 0
    iterator, done = iter(batches), False
    while True:
        done = done or (batch_budget is not None and seen_batches >= batch_budget) or (
            sample_budget is not None and seen_samples >= sample_budget)
        if not done:
            try:
                batch = next(iterator)
            except StopIteration:
                done = True
        if not done:
            forward(model, batch)
            raise_if_interrupted()  # a Ctrl-C held back during the pass stops here, everything restored
            seen_batches += 1
            seen_samples += batch_size(batch, required=sample_budget is not None)
            bar.update()
        if bounds is None or (done and bounds.world_size == 1):
            if done:
                return seen_batches, seen_samples, False
            continue
        step = max(seen_batches, bounds.next_check) if done else seen_batches  # done: wait at the next check
        if bounds.due(step):
            within, everyone_done = bounds.check(step, done)
            if within:
                return seen_batches, seen_samples, True
            if everyone_done:
                return seen_batches, seen_samples, False


def _forward_naming_keys(model: nn.Module, batch: Any) -> Any:
    """:func:`default_forward`, with a model that refuses a dict batch's keys told what to pass instead."""
    try:
        return default_forward(model, batch)
    except TypeError as error:
        if not isinstance(batch, Mapping) or "argument" not in str(error):
            raise
        raise TypeError(f"{type(model).__name__} does not take this batch's keys {sorted(batch)} as keyword "
                        f"arguments ({error}): pass forward=, e.g. lambda model, batch: "
                        f"model(batch[{next(iter(batch))!r}])") from error


def _expected_batches(batches: Iterable[Any], budget: int | None) -> int | None:
    try:
        length = len(batches)  # type: ignore[arg-type]
    except TypeError:
        return budget
    return length if budget is None else min(length, budget)
