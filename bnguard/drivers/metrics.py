"""Loss and metric sums over samples, kept on the device and reduced across processes on demand."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..recalibration.batches import Forward, batch_targets, logits_of
from ..recalibration.isolation import preserved_modes
from ..utils.distributed import sum_over_processes

Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


_NONE_YET = torch.iinfo(torch.long).max  # no non-finite loss seen: above every step


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf; training stops before anything is logged or saved from it."""


class MetricSums:
    """Sums of loss x samples and of per-sample metric, and the sample count; adding never synchronizes.

    Given steps, it also remembers on the device the first step whose loss was not finite, for the error
    that a non-finite sum leads to (:meth:`first_nonfinite_step`)."""

    def __init__(self, device: torch.device | str):
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.score = torch.zeros((), dtype=torch.float64, device=device)
        self.count = 0
        self.has_loss = self.has_score = False
        self._first_bad = torch.full((), _NONE_YET, dtype=torch.long, device=device)

    def add(self, mean_loss: torch.Tensor | float | None, scores: torch.Tensor | None, step: int | None = None,
            count: int | None = None) -> None:
        """One batch: its mean loss and per-sample scores, either one left out (None); ``count`` samples
        when there are no scores to count. (Runs at every training step: a handful of tensor operations.)"""
        count = scores.numel() if scores is not None else count if count is not None else 1
        if mean_loss is not None:
            mean_loss = torch.as_tensor(mean_loss, device=self.loss.device).detach()
            self.loss.add_(mean_loss, alpha=count)  # in float64
            self.has_loss = True
            if step is not None:  # the earliest step whose loss is not finite
                torch.minimum(self._first_bad, torch.where(torch.isfinite(mean_loss), _NONE_YET, step),
                              out=self._first_bad)
        if scores is not None:
            self.score.add_(scores.detach().sum())
            self.has_score = True
        self.count += count

    def first_nonfinite_step(self) -> int | None:
        """The first step added with a NaN/Inf loss on this process, if any (synchronizes: for errors only)."""
        step = int(self._first_bad.item())
        return step if step != _NONE_YET else None

    def compute(self, prefix: str, metric_name: str, world_size: int = 1) -> dict[str, float]:
        """``{prefix_loss, prefix_<metric_name>}`` over all samples (those that were added), summed over
        ``world_size`` processes (each must call it)."""
        count = torch.tensor(float(self.count), dtype=torch.float64, device=self.loss.device)
        loss, score, count = sum_over_processes(torch.stack([self.loss, self.score, count]), world_size).tolist()
        if count == 0:  # a mean over nothing is no metric: 0.0 here would read as a real score
            raise ValueError(f"no {prefix} sample was seen: the {prefix} data yielded no batch on any process")
        return {**({f"{prefix}_loss": loss / count} if self.has_loss else {}),
                **({f"{prefix}_{metric_name}": score / count} if self.has_score else {})}

    def state_dict(self) -> dict[str, Any]:
        """The sums as plain numbers (synchronizes), for a checkpoint taken mid-epoch."""
        return {"loss": self.loss.item(), "score": self.score.item(), "count": self.count,
                "has_loss": self.has_loss, "has_score": self.has_score}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss.fill_(state["loss"])
        self.score.fill_(state["score"])
        self.count, self.has_loss, self.has_score = state["count"], state["has_loss"], state["has_score"]


@torch.no_grad()
def evaluate_classifier(model: Any, loader: Any, accelerator: Any, loss_fn: Callable[..., torch.Tensor],
                        metric: Metric, metric_name: str, forward: Forward) -> dict[str, float]:
    """Eval-mode ``eval_loss`` and ``eval_<metric_name>`` over a prepared loader (``forward(model, batch)``
    gives the outputs; targets as :func:`batch_targets` finds them), each sample counted once across
    processes; every module's mode is restored."""
    sums = MetricSums(accelerator.device)
    with preserved_modes(model):  # frozen layers stay in eval mode
        model.eval()
        for batch in loader:
            logits, targets = accelerator.gather_for_metrics((logits_of(forward(model, batch)), batch_targets(batch)))
            sums.add(loss_fn(logits, targets), metric(logits, targets))
    return sums.compute("eval", metric_name)
