"""Scheduled recalibration: exact BatchNorm statistics before evaluations, whatever they would show."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from ..recalibration.isolation import restore_statistics, saved_statistics
from ..utils.validation import positive_int
from .recalibrating import HOOK_TOLERANCE, RecalibratingHook, Target
from .record_keys import RecordKeys
from .state import State


class PreciseBN(RecalibratingHook):
    """Recalibrates the BatchNorm statistics before scheduled evaluations (at EVAL_START), so that those
    evaluations see statistics estimated for the weights being evaluated, and records ``recalibrated``,
    ``reason``, ``recal_seconds`` and ``recal_samples`` (see :class:`~bnguard.RecordKeys`) for every
    evaluation. Unlike :class:`~bnguard.AutoRecalibrate` it does not look at the metrics first: it costs a
    recalibration per scheduled evaluation and never lets stale statistics reach one.

    The first recalibration is checked: the evaluation runs again with the statistics it replaced, and when
    the new ones make the monitored metric worse by more than ``margin`` they are undone, with a warning
    naming the likely cause (recalibration batches not prepared like the training batches).

    Args:
        every_n_evals: recalibrate before every this many evaluations.
        tolerance: stop once every layer's error bound is within it (see :func:`~bnguard.recalibrate`); None
            takes ``num_samples`` whatever the precision.
        num_samples: the most training samples one recalibration uses.
        include_frozen: recalibrate also the BatchNorm layers that were not updating their statistics
            during training (frozen for fine-tuning), which otherwise keep them.
        target: another model to recalibrate than the trained one (or a callable giving it), e.g. the EMA /
            SWA copy the evaluation uses.
        monitor: the metric that judges the first recalibration, ``eval_<monitor>``. ``"auto"``: by
            ``eval_loss``, else ``eval_acc``, else another loss or accuracy the evaluation gives; with a
            ``target``, the first of those that the target's statistics moved (a metric of the trained model
            cannot judge them). None skips the check, which costs one evaluation per run.
        higher_is_better: default False for a name with "loss" in it, else True.
        margin: how much worse (in the metric's units) undoes the first recalibration.
    """

    reevaluation_optional = True

    def __init__(self, every_n_evals: int = 1, *, tolerance: float | None = HOOK_TOLERANCE, num_samples: int = 4096,
                 include_frozen: bool = False, target: Target = None, monitor: str | None = "auto",
                 higher_is_better: bool | None = None, margin: float = 0.05):
        super().__init__(tolerance=tolerance, num_samples=num_samples, include_frozen=include_frozen, target=target)
        self.every_n_evals = positive_int("every_n_evals", every_n_evals)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin >= 0:
            raise ValueError(f"margin must be a number >= 0 (in the units of the metric checked), got {margin!r}")
        self.monitor = monitor
        self.higher_is_better = higher_is_better
        self.margin = margin
        self.reevaluates = monitor is not None
        self.evaluations = 0
        self.checked = monitor is None
        self._outcome: dict[str, Any] = {}
        self._replaced: tuple[nn.Module, dict[torch.Tensor, torch.Tensor]] | None = None
        self._started = False
        self._bound: dict[str, float] = {}

    def on_eval_start(self, state: State) -> None:
        self._started = True
        self.evaluations += 1
        if self.evaluations % self.every_n_evals:
            self._outcome = {RecordKeys.RECALIBRATED: False, RecordKeys.SECONDS: 0.0, RecordKeys.SAMPLES: 0,
                             RecordKeys.REASON: f"not scheduled: every {self.every_n_evals} evaluations"}
            return
        started = time.perf_counter()
        model, frozen = self._target(state)
        if not self.checked:
            self._replaced = (model, saved_statistics(model))
        report, why_not = self._recalibrate_statistics(model, state.train_batches(), accelerator=state.accelerator,
                                                       frozen=frozen, forward=state.forward)
        self._outcome = {RecordKeys.RECALIBRATED: why_not is None, RecordKeys.SECONDS: time.perf_counter() - started,
                         RecordKeys.SAMPLES: report.samples if why_not is None else 0,
                         RecordKeys.REASON: self._schedule() if why_not is None else f"nothing recalibrated: {why_not}"}
        self._bound = RecordKeys.bound(report if why_not is None else None)
        if why_not is None:
            state.recalibrated(report)

    def on_eval_end(self, state: State) -> None:
        if not self._started:  # the loop evaluated without announcing it: nothing was recalibrated
            self._warn_once("no eval start", "PreciseBN recalibrates at EVAL_START, but EVAL_END came without "
                            "it: fire Event.EVAL_START before evaluating")
            self._outcome = {RecordKeys.RECALIBRATED: False, RecordKeys.SECONDS: 0.0, RecordKeys.SAMPLES: 0,
                             RecordKeys.REASON: "no EVAL_START was fired: nothing recalibrated"}
        self._started = False
        if self._replaced is not None and self._outcome[RecordKeys.RECALIBRATED]:
            self._check(state, *self._replaced)
        self._replaced = None
        outcome = self._outcome
        state.record.update(RecordKeys.of(self.decision_prefix, outcome))
        recalibrated = outcome[RecordKeys.RECALIBRATED]
        state.log(RecordKeys.tracked(self.decision_prefix, {
            RecordKeys.RECALIBRATED: float(recalibrated), RecordKeys.SECONDS: outcome[RecordKeys.SECONDS],
            RecordKeys.SAMPLES: outcome[RecordKeys.SAMPLES], **(self._bound if recalibrated else {})}))
        state.trackers.log_tags(RecordKeys.tracked(self.decision_prefix,
                                                   {RecordKeys.REASON: outcome[RecordKeys.REASON]}))

    def _check(self, state: State, model: nn.Module, replaced: dict[torch.Tensor, torch.Tensor]) -> None:
        """The first recalibration against the statistics it replaced, on ``eval_<monitor>``."""
        keys = [key for key in _candidates(self.monitor, state.eval_metrics) if key in state.eval_metrics]
        if not keys:
            self._warn_once("check", f"PreciseBN checks its first recalibration on eval_{self.monitor}, which the "
                            f"evaluation does not give ({sorted(state.eval_metrics)}): pass monitor= one it gives")
            return
        self.checked = True
        if state.cannot_reevaluate is not None:
            self._warn_once("cannot", f"PreciseBN left its first recalibration unchecked: the check evaluates again, "
                            f"and {state.cannot_reevaluate}; monitor=None turns the check off")
            return
        recalibrated = saved_statistics(model)
        restore_statistics(replaced)
        before = state.evaluate()
        moved = [key for key in keys if before.get(key) != state.eval_metrics[key]]
        if self.target is not None and not moved:  # the metrics measure another model than the target
            restore_statistics(recalibrated)
            self._warn_once("target metric", f"PreciseBN(target=...) recalibrated {type(model).__name__}, and "
                            f"{', '.join(keys)} did not move at all: it measures another model, most likely the "
                            "trained one (or ties, as an accuracy can), so the recalibration was not checked. Give "
                            "the target's own metric as monitor, e.g. monitor='ema_loss' with the evaluation "
                            "returning it (a loss judges finest)")
            return
        key = moved[0] if self.target is not None else keys[0]
        new, old = state.eval_metrics[key], before[key]
        higher_is_better = self.higher_is_better if self.higher_is_better is not None else "loss" not in key
        if (old - new if higher_is_better else new - old) <= self.margin:
            restore_statistics(recalibrated)
            return
        state.eval_metrics = {**state.eval_metrics, **before}  # what the statistics kept give
        self._outcome = {**self._outcome, RecordKeys.RECALIBRATED: False,
                         RecordKeys.REASON: f"recalibration made {key} worse ({old:.4g} -> {new:.4g}): undone"}
        self._warn_once("worse", f"PreciseBN's first recalibration made {key} worse ({old:.4g} -> {new:.4g}), so "
                        "it was undone: the recalibration batches are most likely not prepared like the training "
                        "batches (normalization, augmentation, forward=); later recalibrations are not checked")

    def _schedule(self) -> str:
        return "always" if self.every_n_evals == 1 else f"scheduled: every {self.every_n_evals} evaluations"

    def state_dict(self) -> dict[str, Any]:
        return {"evaluations": self.evaluations, "checked": self.checked}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.evaluations = state["evaluations"]
        self.checked = state.get("checked", True)  # a state saved before the check existed: past its first


def _candidates(monitor: str, eval_metrics: dict[str, float]) -> list[str]:
    """The eval metrics that may judge a recalibration, in order: ``eval_<monitor>``, or for "auto" eval_loss,
    eval_acc and then the evaluation's other losses and accuracies (``loss``, ``acc`` or ``top`` in the name;
    not its timings)."""
    if monitor != "auto":
        return [f"eval_{monitor}"]
    others = [key for key in eval_metrics if key not in ("eval_loss", "eval_acc")
              and any(kind in key.removeprefix("eval_") for kind in ("loss", "acc", "top"))]
    return ["eval_loss", "eval_acc", *others]
