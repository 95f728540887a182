"""Accuracy and cross-entropy on the eval split, summed exactly over processes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..recalibration.batches import accuracy, batch_targets, default_forward, logits_of, to_device
from ..recalibration.isolation import preserved_modes
from ..utils.console import show_progress
from ..utils.distributed import sum_over_processes
from .errors import InputError


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Any], device: torch.device, *, rank: int, world_size: int,
             label: str) -> dict[str, float]:
    """Eval-mode accuracy and mean cross-entropy of ``model`` over every process's batches, and the number of
    classes its logits score."""
    sums, classes = torch.zeros(3, dtype=torch.float64), 0
    bar = tqdm(batches, desc=label, unit="batch", leave=False, disable=not show_progress(True, rank == 0))
    with preserved_modes(model):
        model.eval()
        for index, batch in enumerate(bar):
            batch = to_device(batch, device)
            logits, labels = _logits_and_labels(model, batch, first=index == 0)
            classes = logits.shape[1]
            sums += torch.stack([accuracy(logits, labels).sum().cpu(),
                                 nn.functional.cross_entropy(logits.float(), labels, reduction="sum").double().cpu(),
                                 torch.tensor(float(labels.numel()), dtype=torch.float64)])
    correct, loss, count = sum_over_processes(sums.to(device), world_size).tolist()
    if count == 0:
        raise InputError("the eval split is empty: give data with eval samples")
    return {"accuracy": correct / count, "loss": loss / count, "samples": int(count), "classes": classes}


def _logits_and_labels(model: nn.Module, batch: Any, first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        labels = batch_targets(batch)
    except TypeError:
        raise InputError("eval batches must carry class labels: (inputs, labels) pairs or dicts with 'labels'") \
            from None
    try:
        outputs = default_forward(model, batch)
    except (RuntimeError, ValueError, TypeError) as error:
        if not first:
            raise
        raise InputError(f"the model refused the data: a batch of {_shapes(batch)} gave {type(error).__name__}: "
                         f"{str(error).splitlines()[0]}; check --data, --image-size and the model's input "
                         "channels") from None
    logits = logits_of(outputs[0] if isinstance(outputs, (tuple, list)) else outputs)  # return_dict=False: a tuple
    if first and (logits.dim() != 2 or logits.shape[0] != labels.shape[0]):
        raise InputError(f"the model's output has shape {list(logits.shape)} for {labels.shape[0]} labels: "
                         "bnguard scores classifiers, whose outputs are (batch, classes) logits")
    return logits, labels


def _shapes(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return f"shape {list(batch.shape)}"
    values = batch.values() if isinstance(batch, Mapping) else batch
    return "inputs " + ", ".join(str(list(v.shape)) for v in values if isinstance(v, torch.Tensor))
