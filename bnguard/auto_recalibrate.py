"""Noticing stale BatchNorm statistics as they happen, curing them, and saying what was found."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .hooks import Hook, State
from .layers import batchnorm_layers, tracks_statistics, unwrap_model
from .recalibrate import default_forward, recalibrate, to_device
from .report import RecalibrationReport
from .tracking import wandb_run

STALE = "stale statistics"
UNEXPLAINED = "gap not explained by BN statistics (overfitting or distribution shift)"
MODES = ("auto", "always", "monitor")


@dataclass
class Decision:
    """What one check found and did. Values are in the watched metric's units."""

    triggered: bool
    recalibrated: bool
    reason: str
    eval_before: float | None = None
    eval_after: float | None = None
    gained: float | None = None
    gap: float | None = None
    drop: float | None = None
    samples: int = 0
    seconds: float = 0.0
    diagnosis: str | None = None
    report: RecalibrationReport | None = None
    eval_metrics: dict[str, float] | None = None

    def summary(self) -> dict[str, Any]:
        """The decision without the report, for records and trackers."""
        return {k: v for k, v in asdict(self).items() if k not in ("report", "eval_metrics")}


class AutoRecalibrate(Hook):
    """After each evaluation, compares the eval metric (eval mode, running statistics) with the train metric
    and with the best eval value so far; when the gap exceeds ``gap_threshold`` or the value fell more than
    ``drop_threshold`` below its best for ``patience`` evaluations in a row, it recalibrates the BatchNorm
    statistics on up to ``num_samples`` training samples, re-evaluates and keeps the new statistics.

    If recalibration recovers less than ``recovery_margin`` while the gap stays, the gap is not explained by
    the statistics: it says so and backs off, skipping the next 1, 2, 4, ... (at most ``max_cooldown``)
    evaluations. ``probe_samples`` turns on a cheap check first: eval-mode against train-mode accuracy on a
    fixed subset of training data, which skips the recalibration when the two agree.

    Defaults come from the example (digits, the seed's network, ``benchmarks/fluctuation.py``): stale
    statistics cost 7 to 31 points of eval accuracy in a single epoch there, while the weights themselves
    move it by up to 6 (measured with statistics recalibrated before every evaluation). A 5-point gap or a
    3-point fall below the best, with patience 1, catches every stale dip the first time it shows; a fall
    the weights caused is checked once, found unexplained and backed off from. 4,096 samples re-estimate
    the statistics (the whole digits training set is 1,347) in well under a second.

    ``mode="always"`` recalibrates before every evaluation (scheduled precise BN, for comparison);
    ``mode="monitor"`` detects and reports but never changes the statistics. ``metric`` names the metric
    (``train_<metric>`` / ``eval_<metric>``); set ``higher_is_better=False`` for a loss.

    Outside :class:`bnguard.Loop`, call :meth:`check` after evaluating.
    """

    def __init__(
        self,
        mode: str = "auto",
        *,
        metric: str = "acc",
        higher_is_better: bool = True,
        gap_threshold: float = 0.05,
        drop_threshold: float = 0.03,
        patience: int = 1,
        recovery_margin: float = 0.01,
        num_samples: int = 4096,
        max_cooldown: int = 8,
        probe_samples: int | None = None,
        alert_every_s: float = 3600.0,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        for name, value in (("patience", patience), ("num_samples", num_samples), ("max_cooldown", max_cooldown),
                            ("probe_samples", probe_samples or 1)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.mode, self.metric, self.higher_is_better = mode, metric, higher_is_better
        self.gap_threshold, self.drop_threshold, self.patience = gap_threshold, drop_threshold, patience
        self.recovery_margin, self.num_samples, self.max_cooldown = recovery_margin, num_samples, max_cooldown
        self.probe_samples, self.alert_every_s = probe_samples, alert_every_s
        self.best: float | None = None
        self.cooldown = 0  # evaluations still to skip
        self.backoff = 1  # the next cooldown, doubled after each unexplained gap
        self.streak = 0  # evaluations in a row over a threshold
        self.history: list[dict[str, Any]] = []
        self._last_alert = -float("inf")
        self._pending: Decision | None = None

    # ---- the check, usable in any loop -------------------------------------------------------------
    def check(
        self,
        model: nn.Module,
        *,
        eval_value: float,
        train_value: float | None = None,
        evaluate: Callable[[], Mapping[str, float] | float],
        batches: Iterable[Any] | Callable[[], Iterable[Any]],
        accelerator: Any = None,
    ) -> Decision:
        """Decides after one evaluation and acts on it; returns the :class:`Decision` (with the new eval
        value when it recalibrated). ``batches``: training batches, or a callable giving them, only called
        when a recalibration happens. Every process must call it with the same (gathered) metrics."""
        gap = self._worse_by(eval_value, train_value) if train_value is not None else None
        drop = self._worse_by(eval_value, self.best) if self.best is not None else None
        self._remember(eval_value)
        reasons = []
        if gap is not None and gap > self.gap_threshold:
            reasons.append(f"eval {self.metric} {gap:.3f} below train (threshold {self.gap_threshold})")
        if drop is not None and drop > self.drop_threshold:
            reasons.append(f"eval {self.metric} {drop:.3f} below its best (threshold {self.drop_threshold})")
        self.streak = self.streak + 1 if reasons else 0
        triggered = self.streak >= self.patience
        decision = Decision(triggered, False, "; ".join(reasons) or "within thresholds", eval_value, gap=gap, drop=drop)
        if not triggered or self.mode == "always":
            return self._log(decision)
        if self.mode == "monitor":
            decision.reason += "; monitor mode: statistics left as they are"
            return self._log(decision)
        if self.cooldown > 0:
            self.cooldown -= 1
            decision.reason += f"; backing off ({self.cooldown + 1} evaluation(s) of cooldown left)"
            return self._log(decision)
        if self.probe_samples is not None:
            eval_mode, train_mode = self._probe(model, _call(batches), accelerator)
            if self._worse_by(eval_mode, train_mode) <= self.recovery_margin:
                decision.diagnosis = UNEXPLAINED
                decision.reason += (f"; probe: eval-mode {eval_mode:.3f} vs train-mode {train_mode:.3f} on "
                                    "training data, statistics not stale")
                self._back_off()
                return self._log(decision)
        self._recalibrate_and_judge(decision, model, evaluate, batches, accelerator)
        return self._log(decision)

    def _recalibrate_and_judge(self, decision: Decision, model, evaluate, batches, accelerator) -> None:
        started = time.perf_counter()
        decision.report = recalibrate(model, _call(batches), num_samples=self.num_samples,
                                      accelerator=accelerator, progress=False)
        result = evaluate()
        decision.eval_metrics = dict(result) if isinstance(result, Mapping) else None
        after = result[f"eval_{self.metric}"] if isinstance(result, Mapping) else float(result)
        decision.recalibrated, decision.eval_after = True, after
        decision.samples, decision.seconds = decision.report.samples, time.perf_counter() - started
        decision.gained = self._worse_by(decision.eval_before, after)
        self._remember(after)
        still_gap = decision.gap is not None and decision.gap - decision.gained > self.gap_threshold
        if decision.gained < self.recovery_margin and (still_gap or decision.gap is None):
            decision.diagnosis = UNEXPLAINED
            self._back_off()
        else:
            decision.diagnosis = STALE
            self.backoff = 1

    def _back_off(self) -> None:
        self.cooldown = self.backoff
        self.backoff = min(self.backoff * 2, self.max_cooldown)

    def _worse_by(self, value: float, reference: float) -> float:
        """How much worse ``value`` is than ``reference`` (positive: worse), whichever direction is better."""
        return reference - value if self.higher_is_better else value - reference

    def _remember(self, value: float) -> None:
        if self.best is None or self._worse_by(value, self.best) < 0:
            self.best = value

    def _log(self, decision: Decision) -> Decision:
        self.history.append(decision.summary())
        return decision

    def _probe(self, model: nn.Module, batches: Iterable[Any], accelerator: Any) -> tuple[float, float]:
        """Accuracy on up to ``probe_samples`` training samples in eval mode and with batch statistics
        (BatchNorm layers in train mode, their buffers restored bit for bit afterwards)."""
        model = unwrap_model(model)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        layers = [layer for _, layer in batchnorm_layers(model) if tracks_statistics(layer)]
        saved = [{k: v.clone() for k, v in layer._buffers.items() if v is not None} for layer in layers]
        modes = [(m, m.training) for m in model.modules()]
        sums = torch.zeros(3, dtype=torch.float64)
        try:
            with torch.no_grad():
                for batch in batches:
                    batch = to_device(batch, device)
                    targets = batch[1].cpu()
                    model.eval()
                    eval_correct = (default_forward(model, batch).argmax(-1).cpu() == targets).sum()
                    for layer in layers:
                        layer.train()
                    train_correct = (default_forward(model, batch).argmax(-1).cpu() == targets).sum()
                    sums += torch.stack([eval_correct, train_correct, torch.tensor(targets.numel())]).double()
                    if sums[2] >= self.probe_samples / (accelerator.num_processes if accelerator else 1):
                        break
        finally:
            for layer, buffers in zip(layers, saved):
                for key, value in buffers.items():
                    layer._buffers[key].copy_(value)
            for module, training in modes:
                module.training = training
        if accelerator is not None and accelerator.num_processes > 1:
            sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
        eval_correct, train_correct, count = sums.tolist()
        return eval_correct / max(count, 1.0), train_correct / max(count, 1.0)

    # ---- the hook ----------------------------------------------------------------------------------
    def on_fit_start(self, state: State) -> None:
        if state.evaluator is None:
            raise ValueError("AutoRecalibrate needs evaluation: give the loop an eval_loader")

    def on_eval_start(self, state: State) -> None:
        if self.mode != "always":
            return
        started = time.perf_counter()
        report = recalibrate(state.model, state.train_batches(), num_samples=self.num_samples,
                             accelerator=state.accelerator, progress=False)
        self._pending = Decision(False, True, "always", samples=report.samples,
                                 seconds=time.perf_counter() - started, report=report)
        state.recalibrated(report)

    def on_eval_end(self, state: State) -> None:
        eval_key, train_key = f"eval_{self.metric}", f"train_{self.metric}"
        if eval_key not in state.eval_metrics:
            raise KeyError(f"AutoRecalibrate watches {eval_key!r} but the evaluation gave {sorted(state.eval_metrics)}")
        decision = self.check(state.model, eval_value=state.eval_metrics[eval_key],
                              train_value=state.train_metrics.get(train_key), evaluate=state.evaluate,
                              batches=state.train_batches, accelerator=state.accelerator)
        if self._pending is not None:  # "always": the recalibration happened before this evaluation
            pending, self._pending = self._pending, None
            decision.recalibrated, decision.reason = True, pending.reason
            decision.samples, decision.seconds, decision.report = pending.samples, pending.seconds, pending.report
            decision.eval_before, decision.eval_after = None, state.eval_metrics[eval_key]
            self.history[-1] = decision.summary()
        elif decision.recalibrated:
            state.eval_metrics = {**state.eval_metrics, **(decision.eval_metrics or {eval_key: decision.eval_after})}
            state.recalibrated(decision.report)
        self._publish(state, decision)

    def _publish(self, state: State, decision: Decision) -> None:
        eval_key = f"eval_{self.metric}"
        state.record.update({
            "recalibrated": decision.recalibrated,
            "reason": decision.reason,
            f"{eval_key}_before_recal": decision.eval_before if decision.recalibrated else None,
            "recal_seconds": decision.seconds,
            "recal_samples": decision.samples,
            "diagnosis": decision.diagnosis,
        })
        values = {"bnguard/recalibrated": float(decision.recalibrated), "bnguard/recal_seconds": decision.seconds}
        for name in ("gap", "drop", "gained"):
            if getattr(decision, name) is not None:
                values[f"bnguard/{name}"] = getattr(decision, name)
        if decision.recalibrated and decision.eval_before is not None:
            values[f"bnguard/{eval_key}_before_recal"] = decision.eval_before
            values[eval_key] = decision.eval_after
        state.log(values)
        if decision.triggered and state.is_main_process:
            print(self._line(state, decision), flush=True)
            self._alert(state, decision)

    def _line(self, state: State, d: Decision) -> str:
        text = f"bnguard: epoch {state.epoch + 1}, step {state.step}: {d.reason}"
        if d.recalibrated and d.eval_before is not None:
            text += (f"; recalibrated BatchNorm on {d.samples} samples in {d.seconds:.2f} s: eval {self.metric} "
                     f"{d.eval_before:.4f} -> {d.eval_after:.4f} ({d.gained:+.4f})")
        return text + (f"; verdict: {d.diagnosis}" if d.diagnosis else "")

    def _alert(self, state: State, decision: Decision) -> None:
        run = wandb_run(state.accelerator)
        now = time.monotonic()
        if run is None or run.settings.mode != "online" or now - self._last_alert < self.alert_every_s:
            return
        import wandb

        self._last_alert = now
        run.alert(title="bnguard: eval diverged from train", text=self._line(state, decision),
                  level=wandb.AlertLevel.WARN)

    # ---- checkpointing -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "cooldown": self.cooldown, "backoff": self.backoff, "streak": self.streak,
                "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.cooldown, self.backoff = state["best"], state["cooldown"], state["backoff"]
        self.streak, self.history = state["streak"], list(state["history"])


def _call(batches: Iterable[Any] | Callable[[], Iterable[Any]]) -> Iterable[Any]:
    return batches() if callable(batches) else batches
