"""Train loss and metric counted from what a hand-written loop already has: each step's outputs and targets."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..recalibration.batches import accuracy, batch_size, batch_targets, logits_of
from ..utils.distributed import process_info
from .metrics import Metric, MetricSums

PERCENT = 100.0


class TrainCounts:
    """``train_loss`` and ``train_<metric_name>`` since the last :meth:`reset`, kept on the device (adding
    never synchronizes) and summed over processes (the accelerator's, else the default process group's).

    ``train_<metric_name>`` is given times ``scale``, so that it compares with the evaluation's value: None
    detects it for bnguard's own :func:`~bnguard.accuracy` (a fraction), which is then counted in percent
    once an evaluation gives ``eval_<metric_name>`` above 1 (:meth:`follow_scale`); another metric keeps its
    own scale."""

    def __init__(self, metric: Metric | None, metric_name: str, device: torch.device, accelerator: Any = None,
                 scale: float | None = None):
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
            raise ValueError(f"metric_scale must be a number above 0 (100: the evaluation gives percent), got "
                             f"{scale!r}")
        self.metric, self.metric_name, self.accelerator = metric, metric_name, accelerator
        self.sums = MetricSums(device)
        self.scale, self.detects_scale = float(scale or 1), scale is None and metric is accuracy

    def add(self, outputs: Any, targets: torch.Tensor | None, loss: Any, batch: Any, step: int) -> None:
        """One batch: ``loss`` (else ``outputs.loss`` / ``outputs["loss"]``), and ``metric`` of the outputs'
        logits against ``targets`` (else the ``batch``'s)."""
        if targets is None and batch is not None:
            targets = batch_targets(batch)
        if loss is None:
            loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
        scores = None
        if self.metric is not None and outputs is not None and targets is not None:
            logits = logits_of(outputs).detach()
            scores = self.metric(logits, targets.to(logits.device))
        count = batch_size(targets if targets is not None else batch, required=False) or 1
        self.sums.add(loss, scores, step=step, count=count)

    def metrics(self) -> dict[str, float]:
        """The means so far, over every process (each must call it); {} before any batch."""
        world_size = process_info(self.accelerator)[1]
        if world_size == 1 and self.sums.count == 0:
            return {}
        try:
            return self.scaled(self.sums.compute("train", self.metric_name, world_size))
        except ValueError:  # no process has counted a sample yet
            return {}

    def follow_scale(self, eval_metrics: dict[str, float]) -> bool:
        """Counts in percent from now on when the evaluation's ``eval_<metric_name>`` is above 1 (torchvision's
        and timm's top1) and the scale is detected; returns whether it changed."""
        value = eval_metrics.get(f"eval_{self.metric_name}")
        if not self.detects_scale or self.scale != 1.0 or value is None or not value > 1:
            return False
        self.scale = PERCENT
        return True

    def scaled(self, train_metrics: dict[str, float]) -> dict[str, float]:
        """``train_metrics`` counted as fractions, with ``train_<metric_name>`` on this scale."""
        key = f"train_{self.metric_name}"
        return {name: value * self.scale if name == key else value for name, value in train_metrics.items()}

    def reset(self) -> None:
        self.sums = MetricSums(self.sums.loss.device)

    def state_dict(self) -> dict[str, Any]:
        return {**self.sums.state_dict(), "scale": self.scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums.load_state_dict(state)
        self.scale = state.get("scale", self.scale)
