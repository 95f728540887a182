"""Loss and metric sums over samples, kept on the device and reduced across processes on demand."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample 1.0 / 0.0: whether the highest logit is the target class."""
    return (outputs.argmax(dim=-1) == targets).double()


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
        self._first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def add(self, mean_loss: torch.Tensor, scores: torch.Tensor, step: int | None = None) -> None:
        count = scores.numel()
        self.loss += mean_loss.detach() * count
        self.score += scores.detach().sum()
        self.count += count
        if step is not None:
            bad = (self._first_bad < 0) & ~torch.isfinite(mean_loss.detach())
            self._first_bad = torch.where(bad, step, self._first_bad)

    def first_nonfinite_step(self) -> int | None:
        """The first step added with a NaN/Inf loss on this process, if any (synchronizes: for errors only)."""
        step = int(self._first_bad.item())
        return step if step >= 0 else None

    def compute(self, prefix: str, metric_name: str, accelerator: Any = None) -> dict[str, float]:
        """``{prefix_loss, prefix_<metric_name>}`` over all samples; sums over processes when given one."""
        count = torch.tensor(float(self.count), dtype=torch.float64, device=self.loss.device)
        sums = torch.stack([self.loss, self.score, count])
        if accelerator is not None and accelerator.num_processes > 1:
            sums = accelerator.reduce(sums, reduction="sum")
        loss, score, count = sums.tolist()
        if count == 0:  # a mean over nothing is no metric: 0.0 here would read as a real score
            raise ValueError(f"no {prefix} sample was seen: the {prefix} data yielded no batch on any process")
        return {f"{prefix}_loss": loss / count, f"{prefix}_{metric_name}": score / count}


def batch_targets(batch: Any) -> torch.Tensor:
    """The targets of a batch: the second element of an ``(inputs, targets)`` pair, or ``batch["labels"]``."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, Mapping) and "labels" in batch:
        return batch["labels"]
    raise TypeError(f"cannot find the targets in a {type(batch).__name__} batch: expected (inputs, targets) or a "
                    "mapping with 'labels'; pass a score function that knows the batch format")


def logits_of(outputs: Any) -> torch.Tensor:
    """A model's scores: the outputs themselves, or their ``logits`` (Hugging Face style outputs)."""
    return outputs.logits if hasattr(outputs, "logits") else outputs


def batch_accuracy(outputs: Any, batch: Any) -> torch.Tensor:
    """:func:`accuracy` of the outputs' logits against the batch's own targets (see :func:`batch_targets`)."""
    logits = logits_of(outputs)
    return accuracy(logits, batch_targets(batch).to(logits.device))


@torch.no_grad()
def evaluate_classifier(model: Any, loader: Any, accelerator: Any, loss_fn: Callable[..., torch.Tensor],
                        metric: Metric, metric_name: str, forward: Callable[[Any, Any], Any]) -> dict[str, float]:
    """Eval-mode ``eval_loss`` and ``eval_<metric_name>`` over a prepared loader (``forward(model, batch)``
    gives the outputs; targets as :func:`batch_targets` finds them), each sample counted once across
    processes; the model's mode is restored."""
    was_training = model.training
    model.eval()
    sums = MetricSums(accelerator.device)
    try:
        for batch in loader:
            logits, targets = accelerator.gather_for_metrics((logits_of(forward(model, batch)), batch_targets(batch)))
            sums.add(loss_fn(logits, targets), metric(logits, targets))
    finally:
        model.train(was_training)
    return sums.compute("eval", metric_name)
