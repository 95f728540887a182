"""One training batch through Accelerate: the update rule the loop applies to every batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class TrainStep:
    """Forward, loss and backward for one batch under ``accelerator.accumulate``; where the accumulated
    gradients are synchronized, gradient clipping (``max_grad_norm``), the optimizer and scheduler steps,
    and zeroed gradients (Accelerate's prepared optimizer skips those in between)."""

    def __init__(self, accelerator: Any, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                 loss_fn: Callable[..., torch.Tensor], max_grad_norm: float | None):
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.loss_fn, self.max_grad_norm = loss_fn, max_grad_norm

    def __call__(self, inputs: Any, targets: Any) -> tuple[torch.Tensor, Any]:
        """The batch's mean loss and the model's outputs."""
        acc = self.accelerator
        with acc.accumulate(self.model):
            outputs = self.model(inputs)
            loss = self.loss_fn(outputs, targets)
            acc.backward(loss)
            if acc.sync_gradients and self.max_grad_norm is not None:
                acc.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            self.optimizer.zero_grad()
        return loss, outputs
