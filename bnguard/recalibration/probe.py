"""A cheap test of staleness: the same training batches scored in eval mode and with batch statistics."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..utils.distributed import process_info, sum_over_processes
from .batches import Forward, batch_size, default_forward, to_device
from .isolation import batchnorm_in_train_mode, raise_if_interrupted
from .layers import batchnorm_layers, model_device, tracks_statistics, unwrap_model

Score = Callable[[Any, Any], torch.Tensor]


@torch.no_grad()
def probe(model: nn.Module, batches: Iterable[Any], score: Score, *, num_samples: int, accelerator: Any = None,
          forward: Forward | None = None) -> tuple[float, float]:
    """Mean per-sample ``score(outputs, batch)`` on up to ``num_samples`` training samples (over all
    processes: the ``accelerator``'s, else the default process group's), first in eval mode, then with the
    BatchNorm layers normalizing with batch statistics (every other module in eval mode), the model run by
    ``forward(model, batch)`` (default: as :func:`recalibrate` does). Buffers, modes and random states are
    left exactly as they were."""
    model = unwrap_model(model)
    device = model_device(model)
    layers = [layer for _, layer in batchnorm_layers(model) if tracks_statistics(layer)]
    forward = forward or default_forward
    world_size = process_info(accelerator)[1]
    share = num_samples / world_size
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    with batchnorm_in_train_mode(model, ()):
        model.eval()
        for batch in batches:
            batch = to_device(batch, device)
            eval_mode = score(forward(model, batch), batch).double().sum()
            with _batch_statistics(layers):
                train_mode = score(forward(model, batch), batch).double().sum()
            sums += torch.stack([eval_mode, train_mode, torch.tensor(float(batch_size(batch, True)), device=device)])
            raise_if_interrupted()
            if sums[2] >= share:
                break
    eval_sum, train_sum, count = sum_over_processes(sums, world_size).tolist()
    return eval_sum / max(count, 1.0), train_sum / max(count, 1.0)


@contextmanager
def _batch_statistics(layers: list[_BatchNorm]) -> Iterator[None]:
    """The layers normalize with batch statistics and update no running statistic, so the eval-mode pass of
    the next batch still sees the statistics under test."""
    for layer in layers:
        layer.training, layer.track_running_stats = True, False
    try:
        yield
    finally:
        for layer in layers:
            layer.training, layer.track_running_stats = False, True
