"""Running a model with its BatchNorm layers in train mode, and leaving everything exactly as it was."""

from __future__ import annotations

import random
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .layers import batchnorm_layers, is_uninitialized, tracks_statistics

RandomStates = tuple  # torch CPU, Python, NumPy, and CUDA's when CUDA is in use (else None)


def random_states() -> RandomStates:
    """The global random states: torch (CPU, and CUDA once initialized), Python and NumPy."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), random.getstate(), np.random.get_state(), cuda


def set_random_states(states: RandomStates) -> None:
    torch.set_rng_state(states[0])
    random.setstate(states[1])
    np.random.set_state(states[2])
    if states[3] is not None:
        torch.cuda.set_rng_state_all(states[3])


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Restores the torch (CPU and CUDA), Python and NumPy global random states on exit."""
    states = random_states()
    try:
        yield
    finally:
        set_random_states(states)


@contextmanager
def preserved_modes(model: nn.Module | None) -> Iterator[None]:
    """Puts every module of ``model`` back in the train / eval mode it had, whatever the block did (an
    evaluation's ``model.train()`` at its end would otherwise unfreeze layers kept in eval mode)."""
    modes = [(module, module.training) for module in model.modules()] if model is not None else []
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def isolated_iteration(make: Callable[[], Iterable[Any]]) -> Iterator[Any]:
    """Iterates ``make()`` (called at the first item) on a random stream of its own, which starts where the
    caller's stands: shuffles and augmentations inside draw as usual, and the caller's global random states
    are left exactly as they were between items, wherever the iteration happens."""
    own: RandomStates | None = None
    iterator: Iterator[Any] | None = None
    while True:
        with preserved_rng():
            if own is not None:
                set_random_states(own)
            try:
                iterator = iterator if iterator is not None else iter(make())
                item = next(iterator)
            except StopIteration:
                return
            finally:
                own = random_states()
        yield item


_DEFERRED: list[list[int]] = []  # the Ctrl-Cs held back by each active interrupts_deferred(), innermost last


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Holds Ctrl-C (SIGINT) back until the block is over, then raises it: a restore or a write cut half-way
    would leave a model half-changed. Inside, :func:`raise_if_interrupted` raises it early where stopping is
    clean (between batches). Enter it before the ``try`` whose ``finally`` restores, so that no Ctrl-C can
    land between the two. Signal handlers belong to the main thread, and a process that ignores SIGINT has
    nothing to defer: there the block runs as is."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    _DEFERRED.append(received)
    try:
        yield
    finally:
        del _DEFERRED[next(i for i, held in enumerate(_DEFERRED) if held is received)]  # by identity
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt here
            else:
                raise KeyboardInterrupt


def raise_if_interrupted() -> None:
    """Raises a Ctrl-C that an enclosing :func:`interrupts_deferred` is holding back, now: for loops whose
    iterations can stop cleanly, so that a long recalibration still stops between batches."""
    for received in _DEFERRED:
        if received:
            received.clear()
            raise KeyboardInterrupt


@contextmanager
def batchnorm_in_train_mode(model: nn.Module, layers: Iterable[_BatchNorm], *, others_eval: bool = False,
                            never_written: Iterable[_BatchNorm] = ()) -> Iterator[None]:
    """Puts ``layers`` in train mode (every other module in eval mode with ``others_eval``, else in the mode
    it has) with the running buffers of every BatchNorm layer of ``model`` swapped for scratch copies, so
    forward passes inside write no statistic; the layers in ``never_written`` (whose forward the caller
    replaced with one that writes elsewhere) keep their own, copying nothing.

    On exit, whatever happens: the original buffer tensors are back in place, untouched, and every module's
    mode and the global random states are as before (dropout inside draws from the same stream as it would
    have without the passes). A Ctrl-C inside waits for :func:`raise_if_interrupted` or the end of the block.
    """
    modes = [(module, module.training) for module in model.modules()]  # a wrapper's own mode too
    saved = {layer: dict(layer._buffers) for layer, _ in modes
             if isinstance(layer, _BatchNorm) and tracks_statistics(layer) and not is_uninitialized(layer)}
    kept = {id(layer) for layer in never_written}
    with interrupts_deferred(), preserved_rng():
        try:
            for layer, buffers in saved.items():
                if id(layer) not in kept:
                    layer._buffers.update({k: v.clone() if v is not None else None for k, v in buffers.items()})
            if others_eval:
                for module, _ in modes:
                    _set_training(module, False)
            for layer in layers:
                _set_training(layer, True)
            yield
        finally:
            for layer, buffers in saved.items():
                layer._buffers.update(buffers)
            for module, training in modes:
                if module.training != training:
                    _set_training(module, training)


def _set_training(module: nn.Module, training: bool) -> None:
    # What module.training = ... does for a plain flag, without nn.Module.__setattr__'s search of the
    # parameter, buffer and submodule dicts: a few microseconds a module, twice for every module a pass.
    object.__setattr__(module, "training", training)


def saved_statistics(model: nn.Module) -> dict[torch.Tensor, torch.Tensor]:
    """A copy of every BatchNorm buffer of ``model`` (running mean, variance, batch count), for
    :func:`restore_statistics`."""
    return {buffer: buffer.clone() for _, layer in batchnorm_layers(model)
            if tracks_statistics(layer) and not is_uninitialized(layer)
            for buffer in layer.buffers(recurse=False)}


def restore_statistics(saved: dict[torch.Tensor, torch.Tensor]) -> None:
    """Puts the saved values back into the same buffers, bit for bit, all of them (Ctrl-C waits)."""
    with interrupts_deferred():
        for buffer, value in saved.items():
            buffer.copy_(value)
