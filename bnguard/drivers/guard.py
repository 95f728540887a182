"""bnguard's hooks in a hand-written training loop, in three calls: after each optimizer step, after each
evaluation, at the end::

    guard = bnguard.Guard(model, evaluate=evaluate, train_loader=train_loader)
    for epoch in range(epochs):
        for inputs, targets in train_loader:
            outputs = model(inputs)
            loss = F.cross_entropy(outputs, targets)
            loss.backward(); optimizer.step(); optimizer.zero_grad()
            guard.step(outputs, targets, loss=loss)      # counts train loss and accuracy
        metrics = guard.evaluated(evaluate())            # recalibrated values when bnguard recalibrated
        scheduler.step(metrics["loss"]); save(model, metrics)
    guard.end()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..hooks.auto_recalibrate import AutoRecalibrate
from ..hooks.base import Hook
from ..hooks.bn_stats import BNStatsLogger
from ..hooks.events import Event
from ..hooks.trackers import Trackers
from ..recalibration.batches import Forward, accuracy
from ..recalibration.layers import model_device
from ..utils.console import WarnOnce
from .epoch_events import EpochEvents
from .eval_metrics import Metrics, eval_metrics, in_given_shape
from .metrics import Metric
from .records import plain
from .runner import HookRunner
from .train_counts import TrainCounts
from .training_batches import hook_batches


class Guard:
    """Runs bnguard's hooks in your own loop, firing every :class:`~bnguard.Event` itself (the module
    docstring shows a loop). Its train and eval metrics reach the trackers under ``bnguard/``
    (``bnguard/train_acc``, ``bnguard/eval_acc``), never under the names your loop logs its own by;
    :attr:`records` holds one dict per epoch, as ``metrics.jsonl`` lines. Checkpoint it with
    :meth:`state_dict` / :meth:`load_state_dict` or ``accelerator.register_for_checkpointing(guard)``;
    ``with guard:`` reports an exception to the hooks.

    Args:
        model: the model you train (wrapped or not).
        hooks: default :class:`~bnguard.BNStatsLogger` and :class:`~bnguard.AutoRecalibrate`.
        evaluate: your evaluation, giving a dict of metrics or one number (named ``metric_name``). Hooks run
            it again after a recalibration, every global random state and module mode restored afterwards.
            To the hooks its names get ``eval_`` in front (``val_`` becomes ``eval_``): ``{"top1": ...}`` is
            ``eval_top1`` for ``AutoRecalibrate(monitor="top1")``.
        train_loader: recalibration batches are fresh shuffles of its dataset (its iterator is never touched).
        recalibration_loader: batches to recalibrate on instead, streams too.
        accelerator: steps count where gradients sync, and train metrics are summed over its processes
            (without one, over the default process group's).
        optimizer: for the hooks' state.
        forward: ``forward(model, batch)`` (default :func:`~bnguard.default_forward`).
        metric: per-sample ``metric(logits, targets)`` (default accuracy; None: the loss only).
        metric_name: its name, ``train_<metric_name>`` and ``eval_<metric_name>``.
        metric_scale: train scores are counted times it, to compare with your evaluation's. By default the
            accuracy is counted in percent once your evaluation gives one above 1 (torchvision's and timm's
            top1), else as a fraction; ``metric_scale=100`` states percent from the start.
        trackers: where hooks log (default: ``accelerator``'s trackers, metrics under ``bnguard/``).
        seed: seeds the training batches drawn for hooks.
    """

    def __init__(self, model: nn.Module, hooks: Iterable[Hook] | None = None, *,
                 evaluate: Callable[[], Metrics] | None = None, train_loader: Any = None,
                 recalibration_loader: Iterable[Any] | None = None, accelerator: Any = None, optimizer: Any = None,
                 forward: Forward | None = None, metric: Metric | None = accuracy, metric_name: str = "acc",
                 metric_scale: float | None = None, trackers: Trackers | None = None, seed: int = 0):
        if hooks is None:
            hooks = [BNStatsLogger(overview_metric=metric_name),
                     AutoRecalibrate(monitor=metric_name if metric is not None else "loss",
                                     higher_is_better=metric is not None)]
        self.accelerator, self.metric_name, self._evaluate = accelerator, metric_name, evaluate
        self.batches = hook_batches(train_loader, recalibration_loader, accelerator=accelerator, seed=seed)
        self.runner = HookRunner(hooks, accelerator=accelerator, model=model, optimizer=optimizer,
                                 evaluate=self._hooks_evaluate if evaluate is not None else None,
                                 train_batches=self.batches, forward=forward,
                                 trackers=trackers or Trackers(accelerator, metrics_under="bnguard/"),
                                 evaluation_hint="pass evaluate= to bnguard.Guard")
        self.state = self.runner.state
        device = accelerator.device if accelerator is not None else model_device(model)
        self.epochs = EpochEvents(self.runner, TrainCounts(metric, metric_name, device, accelerator, metric_scale))
        self._warn_once = WarnOnce()

    @property
    def records(self) -> list[dict[str, Any]]:
        """One dict per epoch over: as a ``metrics.jsonl`` line of :class:`bnguard.Loop`."""
        return self.epochs.records

    # ---- the three calls -------------------------------------------------------------------------------
    def step(self, outputs: Any = None, targets: torch.Tensor | None = None, *, loss: Any = None,
             batch: Any = None) -> None:
        """After an optimizer step: counts the batch's loss (``loss``, else ``outputs.loss`` / ``["loss"]``)
        and ``metric`` on its outputs against ``targets`` (else the ``batch``'s), then fires STEP_END."""
        self.epochs.open()
        self.epochs.train_counts.add(outputs, targets, loss, batch, step=self.state.step + 1)
        if self.accelerator is None or self.accelerator.sync_gradients:
            self.runner.fire(Event.STEP_END, step=self.state.step + 1)

    def evaluated(self, metrics: Metrics) -> Metrics:
        """After your evaluation: fires EVAL_START and EVAL_END around ``metrics`` and returns the metrics to
        use from now on, in the same shape, with the values a hook's recalibration changed. A hook that
        recalibrates before evaluations (:class:`~bnguard.PreciseBN`) makes ``metrics`` stale: then
        ``evaluate`` runs again (use :meth:`evaluate` instead to evaluate once)."""
        return self._evaluation(lambda: metrics, measured_before=True)

    def evaluate(self) -> Metrics:
        """Runs ``evaluate`` between EVAL_START and EVAL_END; returns what :meth:`evaluated` would."""
        if self._evaluate is None:
            raise RuntimeError("Guard.evaluate() runs the evaluate function, and none was given: pass "
                               "evaluate= to bnguard.Guard, or call guard.evaluated(metrics) after your own")
        return self._evaluation(self._evaluate, measured_before=False)

    def end(self) -> None:
        """Ends the last epoch and fires FIT_END; later calls do nothing."""
        self.epochs.end()

    def start_epoch(self, epoch: int | None = None) -> None:
        """Optional, at the top of each epoch (``epoch``: its index, default the next), for loops that
        evaluate several times an epoch: epochs then follow these calls instead of ending at each
        evaluation. FIT_START fires at the first call of any method, FIT_END at :meth:`end`."""
        self.epochs.start(epoch)

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> None:
        if error is not None:
            self.runner.fire_exception(error)
        else:
            self.end()

    def _evaluation(self, measure: Callable[[], Metrics], *, measured_before: bool) -> Metrics:
        given = measure() if measured_before else None
        if given is not None:  # its scale is known before the train metrics are
            self.epochs.train_counts.follow_scale(eval_metrics(given, self.metric_name))
        updates = self.epochs.before_evaluation()
        before = self.state.recalibration
        self.runner.fire(Event.EVAL_START, **updates)
        given = measure() if given is None else given
        measured = eval_metrics(given, self.metric_name)
        if self.epochs.train_counts.follow_scale(measured):  # percent, found after the train metrics were given
            self.state.train_metrics = self.epochs.train_counts.scaled(self.state.train_metrics)
            self.state.log(self.state.train_metrics)
        if measured_before and self.state.recalibration is not before:  # a hook recalibrated since
            measured = self._remeasured(measured)
        self.state.eval_metrics = measured
        self.state.log(measured)
        self.runner.fire(Event.EVAL_END)
        result = in_given_shape(given, self.state.eval_metrics, self.metric_name)
        self.epochs.after_evaluation()
        return result

    def _remeasured(self, measured: dict[str, float]) -> dict[str, float]:
        if self._evaluate is not None:
            return self.state.evaluate()
        self._warn_once("stale", "a hook recalibrated at EVAL_START, after the metrics given to guard.evaluated() "
                        "were measured: they describe the old statistics; pass evaluate= to bnguard.Guard and call "
                        "guard.evaluate() instead")
        return measured

    def _hooks_evaluate(self) -> dict[str, float]:
        return eval_metrics(self._evaluate(), self.metric_name)

    # ---- checkpointing -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue as if never interrupted, as plain data."""
        return plain({"hooks": self.runner.state_dict(), "where": self.state.state_dict(),
                      "batches": self.batches.state_dict() if self.batches is not None else None,
                      "epochs": self.epochs.state_dict()})

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.runner.load_state_dict(saved["hooks"])
        self.state.load_state_dict(saved["where"])
        if self.batches is not None and saved["batches"] is not None:
            self.batches.load_state_dict(saved["batches"])
        self.epochs.load_state_dict(saved["epochs"])
