"""One training batch through Accelerate: the update rule the loop applies to every batch."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..recalibration.batches import Forward, batch_targets, logits_of

ComputeLoss = Callable[[torch.nn.Module, Any], "tuple[torch.Tensor, Any]"]


def loss_from_model(model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, Any]:
    """For models that compute their own loss from a dict batch (the Hugging Face convention):
    ``outputs = model(**batch)``, loss ``outputs.loss`` (or ``outputs["loss"]`` for a plain dict)."""
    outputs = model(**batch)
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    if loss is None:
        raise TypeError(f"compute_loss=loss_from_model, but the model's {type(outputs).__name__} output holds no "
                        "loss: pass the labels in the batch, or use the default loss_fn on its logits")
    return loss, outputs


class TrainStep:
    """One batch: ``compute_loss(model, batch) -> (mean loss, outputs)`` and backward under
    ``accelerator.accumulate``; where the accumulated gradients are synchronized, gradient clipping
    (``max_grad_norm``), the optimizer and scheduler steps, and zeroed gradients (Accelerate's prepared
    optimizer skips those in between)."""

    def __init__(self, accelerator: Any, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                 compute_loss: ComputeLoss, max_grad_norm: float | None):
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.compute_loss, self.max_grad_norm = compute_loss, max_grad_norm

    def __call__(self, batch: Any) -> tuple[torch.Tensor, Any]:
        """The batch's mean loss and the model's outputs."""
        acc = self.accelerator
        with acc.accumulate(self.model):
            loss, outputs = self.compute_loss(self.model, batch)
            acc.backward(loss)
            if acc.sync_gradients and self.max_grad_norm is not None:
                acc.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            self.optimizer.zero_grad()
        return loss, outputs


def loss_of(forward: Forward, loss_fn: Callable[..., torch.Tensor]) -> ComputeLoss:
    """The default ``compute_loss``: ``loss_fn(logits, targets)`` on the outputs of ``forward(model, batch)``
    and the batch's targets, for ``(inputs, targets)`` pairs and dict batches with ``labels`` alike."""
    def compute_loss(model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, Any]:
        outputs = forward(model, batch)
        return loss_fn(logits_of(outputs), batch_targets(batch)), outputs

    return compute_loss
