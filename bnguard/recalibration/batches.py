"""Batches and what a model gives back: how a model is called with a batch, where its targets and
logits are, how many samples it holds, and the per-sample accuracy of one."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

Forward = Callable[[nn.Module, Any], Any]  # forward(model, batch) -> outputs


def default_forward(model: nn.Module, batch: Any) -> Any:
    """A tensor is the input; a tuple/list's first element is; a mapping is passed as keyword arguments."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors in a batch (nested in tuples, lists, dicts) moved to `device`; anything else as is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


def batch_size(batch: Any, required: bool) -> int:
    """Samples in a batch: the leading size of its first tensor (0 if none, or an error when ``required``)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for value in values:
        size = batch_size(value, required=False)
        if size:
            return size
    if required:
        raise TypeError(
            f"num_samples needs batches holding a tensor to count samples in, got {type(batch).__name__}; "
            "use num_batches instead"
        )
    return 0


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample 1.0 / 0.0: whether the highest logit is the target class."""
    return (outputs.argmax(dim=-1) == targets).double()


def batch_targets(batch: Any) -> torch.Tensor:
    """The targets of a batch: the second element of an ``(inputs, targets)`` pair, or ``batch["labels"]``."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, Mapping) and "labels" in batch:
        return batch["labels"]
    raise TypeError(f"cannot find the targets in a {type(batch).__name__} batch: expected (inputs, targets) or a "
                    "mapping with 'labels'; pass a score function that knows the batch format")


def logits_of(outputs: Any) -> torch.Tensor:
    """A model's scores: the outputs themselves, or their ``logits`` (Hugging Face style outputs, or a dict)."""
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    return outputs.logits if hasattr(outputs, "logits") else outputs


def batch_accuracy(outputs: Any, batch: Any) -> torch.Tensor:
    """:func:`accuracy` of the outputs' logits against the batch's own targets (see :func:`batch_targets`)."""
    logits = logits_of(outputs)
    return accuracy(logits, batch_targets(batch).to(logits.device))
