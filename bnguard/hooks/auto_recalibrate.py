"""Noticing stale BatchNorm statistics as they happen, curing them, and saying what was found."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from ..recalibration.batches import Forward, batch_accuracy
from ..recalibration.isolation import restore_statistics, saved_statistics
from ..recalibration.layers import has_running_statistics
from ..recalibration.probe import Score, probe
from ..utils.console import WarnOnce
from ..utils.validation import positive_int
from .policy import Decision, DivergencePolicy
from .recalibrating import HOOK_TOLERANCE, RecalibratingHook, Target
from .record_keys import RecordKeys
from .state import State

_OTHER_MODEL = ("AutoRecalibrate(target=...) recalibrated {model}, and eval_{monitor} did not move at all: it "
                "measures another model, most likely the trained one. Give the target's own metric as monitor, "
                "e.g. monitor='ema_acc' with the evaluation returning it, and train_monitor='acc' for the trained "
                "model's train metric it is compared with")
NOTHING_TO_RECALIBRATE = "nothing to recalibrate: the model has no BatchNorm layer with running statistics"
# The thresholds left to their defaults, as fractions of an accuracy's range: 5, 3 and 1 points.
THRESHOLDS = {"gap_threshold": 0.05, "drop_threshold": 0.03, "recovery_margin": 0.01}


class AutoRecalibrate(RecalibratingHook):
    """After each evaluation, asks a :class:`~bnguard.DivergencePolicy` whether the eval metric (eval mode,
    running statistics) has diverged from the train metric or fallen below its best; when it has, recalibrates
    the BatchNorm statistics, re-evaluates, keeps the new statistics, and records the verdict: stale
    statistics, or a gap they do not explain (after which it backs off). The README explains the defaults.
    Outside :class:`bnguard.Loop` and :class:`bnguard.Guard`, call :meth:`check` after evaluating.

    Args:
        monitor: the watched metric, ``eval_<monitor>``; with a ``target``, that model's own eval metric
            (``monitor="ema_acc"`` when the evaluation gives ``ema_acc``).
        higher_is_better: False for a loss.
        gap_threshold, drop_threshold, patience, recovery_margin, max_cooldown: the policy's (see
            :class:`~bnguard.DivergencePolicy`), in the metric's units. Thresholds left to their defaults (5,
            3 and 1 points of an accuracy: 0.05, 0.03, 0.01) are taken in percent, 5, 3 and 1, once the
            monitored accuracy is above 1.
        tolerance, num_samples, include_frozen, target: how and what it recalibrates, as
            :class:`~bnguard.PreciseBN` (see :class:`RecalibratingHook`). BatchNorm layers that were not
            updating their statistics during training (frozen for fine-tuning) keep them unless
            ``include_frozen``; ``target`` recalibrates another model, e.g. an EMA / SWA copy.
        probe_samples: turns on a cheap check first: ``probe_score`` in eval mode against batch statistics
            on that many training samples, which skips the recalibration when the two agree.
        probe_score: per-sample ``probe_score(outputs, batch)`` (default accuracy).
        report_only: detect and report, never change the statistics.
        alert_every_s: at most one tracker alert (W&B) this often.
        train_monitor: the train metric compared, ``train_<train_monitor>`` (default ``monitor``;
            ``train_monitor="acc"`` beside a ``target``'s ``monitor="ema_acc"``).
    """

    reevaluates = True

    def __init__(self, *, monitor: str = "acc", higher_is_better: bool = True, gap_threshold: float | None = None,
                 drop_threshold: float | None = None, patience: int = 1, recovery_margin: float | None = None,
                 max_cooldown: int = 8, tolerance: float | None = HOOK_TOLERANCE, num_samples: int = 4096,
                 probe_samples: int | None = None, probe_score: Score = batch_accuracy, report_only: bool = False,
                 include_frozen: bool = False, target: Target = None, alert_every_s: float = 3600.0,
                 train_monitor: str | None = None):
        self.policy, self.scale = ThresholdScale.policy_for(
            monitor=monitor, higher_is_better=higher_is_better, gap_threshold=gap_threshold, patience=patience,
            drop_threshold=drop_threshold, recovery_margin=recovery_margin, max_cooldown=max_cooldown)
        super().__init__(tolerance=tolerance, num_samples=num_samples, include_frozen=include_frozen, target=target)
        self.monitor = monitor
        self.train_monitor = train_monitor or monitor
        self.report_only = report_only
        self.alert_every_s = alert_every_s
        self.probe_samples = positive_int("probe_samples", probe_samples, optional=True)
        self.probe_score = probe_score
        self.history: list[dict[str, Any]] = []
        self._last_alert = -float("inf")

    def check(self, model: nn.Module, *, eval_value: float, train_value: float | None = None,
              evaluate: Callable[[], Mapping[str, float] | float], batches: Iterable[Any] | Callable[[], Iterable[Any]],
              accelerator: Any = None, nonfinite: Sequence[str] = (), frozen: Iterable[nn.Module] | None = None,
              forward: Forward | None = None) -> Decision:
        """Decides after one evaluation and acts on it; returns the :class:`Decision`. ``batches``: training
        batches, or a callable giving them (called only to recalibrate or probe); ``nonfinite``: the NaN/Inf
        metrics' names; ``frozen``: BatchNorm layers to leave alone; ``forward(model, batch)``: as in
        :func:`recalibrate`. Every process must call it, with the same (gathered) metrics."""
        self.scale.follow(eval_value, train_value, self._warn_once, self.train_monitor)
        decision = self.policy.check(eval_value, train_value, nonfinite=nonfinite)
        if decision.wants_recalibration and not has_running_statistics(model):
            decision = decision.noted(NOTHING_TO_RECALIBRATE, wants_recalibration=False)
            self._warn_once("no batchnorm", f"AutoRecalibrate: {NOTHING_TO_RECALIBRATE}; it only reports")
        if decision.wants_recalibration and self.report_only:
            decision = decision.noted("monitor mode (report_only=True): statistics left as they are",
                                      wants_recalibration=False)
        if decision.wants_recalibration and self.probe_samples is not None:
            eval_mode, train_mode = probe(model, _call(batches), self.probe_score, num_samples=self.probe_samples,
                                          accelerator=accelerator, forward=forward)
            decision = self.policy.judge_probe(decision, eval_mode, train_mode)
        if decision.wants_recalibration:
            decision = self._recalibrate(decision, model, evaluate, _call(batches), accelerator,
                                         frozen=frozen, forward=forward)
        self.history.append(decision.summary())
        return decision

    def _recalibrate(self, decision: Decision, model: nn.Module, evaluate: Callable[[], Any],
                     batches: Iterable[Any], accelerator: Any, **how: Any) -> Decision:
        started = time.perf_counter()
        previous = saved_statistics(model)
        report, why_not = self._recalibrate_statistics(model, batches, accelerator=accelerator, **how)
        if why_not is not None:  # statistics as they were: nothing to judge
            return decision.noted(f"nothing recalibrated: {why_not}", wants_recalibration=False,
                                  seconds=time.perf_counter() - started)
        try:
            result = evaluate()
        except BaseException:  # a re-evaluation that fails leaves the statistics as they were
            restore_statistics(previous)
            raise
        metrics = dict(result) if isinstance(result, Mapping) else {f"eval_{self.monitor}": float(result)}
        after = metrics[f"eval_{self.monitor}"]
        if self.target is not None and after == decision.eval_before:
            self._warn_once("target metric", _OTHER_MODEL.format(monitor=self.monitor, model=type(model).__name__))
        judged = self.policy.judge_recalibration(decision, after, nonfinite=nonfinite_names(metrics))
        if judged.reverted:
            restore_statistics(previous)
        return replace(judged, recalibrated=not judged.reverted, samples=report.samples, report=report,
                       seconds=time.perf_counter() - started, eval_metrics=metrics)

    # ---- the hook ----------------------------------------------------------------------------------
    @property
    def needs_train_batches(self) -> bool:
        return not self.report_only

    def on_fit_start(self, state: State) -> None:
        if not state.has_evaluation:
            raise ValueError(f"AutoRecalibrate needs evaluation: {state.evaluation_hint}")
        super().on_fit_start(state)

    def on_eval_end(self, state: State) -> None:
        eval_key, train_key = f"eval_{self.monitor}", f"train_{self.train_monitor}"
        if eval_key not in state.eval_metrics:
            raise KeyError(f"AutoRecalibrate watches {eval_key!r} but the evaluation gave {sorted(state.eval_metrics)}")
        if train_key not in state.train_metrics:
            self._warn_once("no train metric",
                            f"AutoRecalibrate compares {eval_key} with {train_key}, but the loop gave no {train_key} "
                            f"(train metrics: {sorted(state.train_metrics)}): only falls below the best are "
                            f"detected; fire TRAIN_EPOCH_END with train_metrics={{'{train_key}': ...}}")
        model, frozen = self._target(state)
        decision = self.check(model, eval_value=state.eval_metrics[eval_key],
                              train_value=state.train_metrics.get(train_key), evaluate=state.evaluate,
                              batches=state.train_batches, accelerator=state.accelerator,
                              nonfinite=nonfinite_names({**state.train_metrics, **state.eval_metrics}),
                              frozen=frozen, forward=state.forward)
        if decision.recalibrated:
            state.eval_metrics = {**state.eval_metrics, **decision.eval_metrics}
            state.recalibrated(decision.report)
        self._publish(state, decision, eval_key)

    def _publish(self, state: State, decision: Decision, eval_key: str) -> None:
        state.record.update(RecordKeys.of(self.decision_prefix, _record(decision, eval_key)))
        state.log(_tracker_values(decision, eval_key, self.decision_prefix))
        state.trackers.log_tags(RecordKeys.tracked(self.decision_prefix, _tags(decision)))
        if decision.triggered and state.is_main_process:
            line = _console_line(decision, self.monitor, state)
            print(line, flush=True)
            if time.monotonic() - self._last_alert >= self.alert_every_s and state.trackers.alert(
                    "bnguard: eval diverged from train", line):
                self._last_alert = time.monotonic()

    # ---- checkpointing -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.state_dict(), "history": list(self.history), "percent": self.scale.percent}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self.history = list(state["history"])
        if state.get("percent", False):  # a state saved before percent was detected holds none: a fraction
            self.scale.to_percent()


class ThresholdScale:
    """The scale of the watched accuracy: the ``defaulted`` thresholds of ``policy`` (:data:`THRESHOLDS`, as
    fractions) are taken in percent once the accuracy is above 1 (torchvision's and timm's top1); given ones
    stay in the metric's own units."""

    def __init__(self, policy: DivergencePolicy, defaulted: list[str]):
        self.policy, self.defaulted, self.percent = policy, defaulted, False

    @classmethod
    def policy_for(cls, **settings: Any) -> tuple[DivergencePolicy, ThresholdScale]:
        """A policy whose thresholds given as None take their defaults, and the scale that follows them."""
        defaulted = [name for name in THRESHOLDS if settings[name] is None]
        policy = DivergencePolicy(**{**settings, **{name: THRESHOLDS[name] for name in defaulted}})
        return policy, cls(policy, defaulted)

    def to_percent(self) -> None:
        self.percent = True
        for name in self.defaulted:
            setattr(self.policy, name, 100 * THRESHOLDS[name])

    def follow(self, eval_value: float, train_value: float | None, warn_once: WarnOnce, train_monitor: str) -> None:
        """Percent from the first value above 1; says once what cannot be right on that scale."""
        policy = self.policy
        above = [value for value in (eval_value, train_value) if value is not None and math.isfinite(value)
                 and value > 1]
        if not (policy.higher_is_better and above):
            return
        if not self.percent:
            self.to_percent()
        if train_value is not None and math.isfinite(eval_value) and 0 < train_value <= 1 < eval_value / 10:
            warn_once("scales", f"AutoRecalibrate: eval_{policy.monitor} is {eval_value:g} and train_{train_monitor} "
                      f"{train_value:g}: a percentage beside a fraction? Give both on one scale (bnguard.Guard "
                      "counts train accuracy on the evaluation's)")
        given = {name: getattr(policy, name) for name in THRESHOLDS if name not in self.defaulted}
        if any(given.get(name, 1) < 1 for name in ("gap_threshold", "drop_threshold")):  # meant as fractions?
            stated = ", ".join(f"{name} {value:g}" for name, value in given.items())
            scaled = ", ".join(f"{name}={100 * value:g}" for name, value in given.items())
            warn_once("scale", f"AutoRecalibrate: {policy.monitor} is {above[0]:g}, above 1: a percentage? The "
                      f"thresholds given are in the metric's own units ({stated}), so here they are that many "
                      f"points: give the accuracy as a fraction (divide by 100), or scale them: "
                      f"AutoRecalibrate({scaled})")


def _call(batches: Iterable[Any] | Callable[[], Iterable[Any]]) -> Iterable[Any]:
    return batches() if callable(batches) else batches


def _record(decision: Decision, eval_key: str) -> dict[str, Any]:
    """The keys a decision adds to the epoch's record."""
    return {RecordKeys.RECALIBRATED: decision.recalibrated, RecordKeys.REASON: decision.reason,
            RecordKeys.before_recal(eval_key): decision.eval_before if decision.recalibrated else None,
            RecordKeys.SECONDS: decision.seconds, RecordKeys.SAMPLES: decision.samples,
            RecordKeys.DIAGNOSIS: decision.diagnosis}


def _tracker_values(decision: Decision, eval_key: str, prefix: str) -> dict[str, Any]:
    """What a decision logs to the trackers: under ``bnguard/``, and the new eval value when recalibrated."""
    values = {RecordKeys.RECALIBRATED: float(decision.recalibrated), RecordKeys.SECONDS: decision.seconds,
              RecordKeys.SAMPLES: decision.samples}
    values.update({name: getattr(decision, name) for name in ("gap", "drop", "gained")
                   if getattr(decision, name) is not None})
    if not decision.recalibrated:
        return RecordKeys.tracked(prefix, values)
    values[RecordKeys.before_recal(eval_key)] = decision.eval_before
    values.update(RecordKeys.bound(decision.report))
    return {**RecordKeys.tracked(prefix, values), eval_key: decision.eval_after}


def _tags(decision: Decision) -> dict[str, str]:
    """The decision in words, for trackers with tags: why, and the verdict once there is one."""
    return {RecordKeys.REASON: decision.reason, **({RecordKeys.DIAGNOSIS: str(decision.diagnosis.value)}
                                                   if decision.diagnosis else {})}


def _console_line(d: Decision, monitor: str, state: State) -> str:
    parts = [f"bnguard: epoch {state.epoch + 1}, step {state.step}: {d.reason}"]
    if d.recalibrated:
        gained = f" ({d.gained:+.4f})" if d.gained is not None else ""
        parts.append(f"recalibrated BatchNorm on {d.samples} samples in {d.seconds:.2f} s: eval {monitor} "
                     f"{d.eval_before:.4f} -> {d.eval_after:.4f}{gained}")
    if d.diagnosis:
        parts.append(f"verdict: {d.diagnosis}")
    return "; ".join(parts)


def nonfinite_names(metrics: Mapping[str, Any]) -> list[str]:
    """The metrics whose values are NaN or Inf."""
    return [name for name, value in metrics.items() if isinstance(value, float) and not math.isfinite(value)]
