"""When to recalibrate, and what a recalibration showed: numbers in, decisions out.

Pure Python (no torch), so that any training framework can drive it with the metrics it has.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from enum import Enum
from typing import Any

from ..utils.validation import positive_int


class Verdict(str, Enum):
    """What a triggered check found. The values are what records and trackers show."""

    STALE = "stale statistics"
    UNEXPLAINED = "gap not explained by BN statistics (overfitting or distribution shift)"
    NONFINITE = "non-finite outputs (NaN/Inf): the weights, not the BN statistics"
    WORSE = "recalibration made eval worse: previous statistics restored"

    def __str__(self) -> str:  # the value, also in f-strings (an Enum would print "Verdict.STALE")
        return self.value


@dataclass(frozen=True)
class Decision:
    """What one check found and did. Values are in the watched metric's units; ``gap`` and ``drop`` are
    how much worse eval is than train and than its best (positive: worse).

    ``reverted``: the recalibration made eval worse by more than the margin, so the hook put the previous
    statistics back. The policy fills in the judgement; the hook that acted on it adds ``recalibrated``,
    ``samples``, ``seconds``, ``report`` (the :class:`~bnguard.RecalibrationReport`) and ``eval_metrics``
    (the full re-evaluation).
    """

    triggered: bool
    wants_recalibration: bool = False
    recalibrated: bool = False
    reverted: bool = False
    findings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    eval_before: float | None = None
    eval_after: float | None = None
    gained: float | None = None
    gap: float | None = None
    drop: float | None = None
    diagnosis: Verdict | None = None
    samples: int = 0
    seconds: float = 0.0
    report: Any = None
    eval_metrics: dict[str, float] | None = None

    @property
    def reason(self) -> str:
        """The thresholds crossed, then what was done about it; "within thresholds" when nothing happened."""
        return "; ".join((*self.findings, *self.notes)) or "within thresholds"

    def noted(self, note: str, **changes: Any) -> Decision:
        """A copy with ``note`` added to the reason and ``changes`` applied."""
        return replace(self, notes=(*self.notes, note), **changes)

    def summary(self) -> dict[str, Any]:
        """The decision as plain values, for records and trackers (no report, no full metrics)."""
        fields = {k: v for k, v in asdict(self).items()
                  if k not in ("report", "eval_metrics", "findings", "notes", "wants_recalibration")}
        return {**fields, "reason": self.reason}


class DivergencePolicy:
    """Decides, after each evaluation, whether eval has diverged from train enough to recalibrate, and
    judges the re-evaluation afterwards.

    It triggers when eval is worse than train by more than ``gap_threshold``, or worse than its best so far by
    more than ``drop_threshold``, for ``patience`` evaluations in a row. After a recalibration that gained
    less than ``recovery_margin``, whether a gap or a fall set it off, the statistics were not to blame
    (:attr:`Verdict.UNEXPLAINED`; gaining at least that much is :attr:`Verdict.STALE`): it backs off,
    skipping the next 1, 2, 4, ... (at most ``max_cooldown``) triggered evaluations.

    Args:
        monitor: the metric's name, in reasons.
        higher_is_better: False for a loss.
        gap_threshold: how much worse than train eval may be, in the metric's units.
        drop_threshold: how much worse than its best so far eval may fall.
        patience: evaluations in a row that must be past a threshold.
        recovery_margin: the least gain that shows the statistics were stale.
        max_cooldown: the most triggered evaluations skipped after an unexplained gap.
    """

    def __init__(
        self,
        *,
        monitor: str = "acc",
        higher_is_better: bool = True,
        gap_threshold: float = 0.05,
        drop_threshold: float = 0.03,
        patience: int = 1,
        recovery_margin: float = 0.01,
        max_cooldown: int = 8,
    ):
        self.monitor, self.higher_is_better = monitor, higher_is_better
        self.gap_threshold, self.drop_threshold = gap_threshold, drop_threshold
        self.patience = positive_int("patience", patience)
        self.recovery_margin = recovery_margin
        self.max_cooldown = positive_int("max_cooldown", max_cooldown)
        self.best: float | None = None
        self.cooldown = 0  # triggered evaluations still to skip
        self.backoff = 1  # the next cooldown, doubled after each unexplained gap
        self.streak = 0  # evaluations in a row over a threshold

    def check(self, eval_value: float, train_value: float | None = None, *,
              nonfinite: Sequence[str] = ()) -> Decision:
        """The decision after one evaluation: ``wants_recalibration`` when triggered and not backing off.

        ``nonfinite`` names the metrics (``train_*`` / ``eval_*``) that came out NaN or Inf. Non-finite
        training means the model itself is broken: no recalibration, verdict NONFINITE. Non-finite eval
        alone can be corrupt statistics: it asks for a recalibration. Neither counts towards the best."""
        if nonfinite:
            return self._nonfinite(eval_value, tuple(nonfinite))
        gap = self.worse_by(eval_value, train_value) if train_value is not None else None
        drop = self.worse_by(eval_value, self.best) if self.best is not None else None
        self._remember(eval_value)
        findings, worse = [], "below" if self.higher_is_better else "above"  # a loss is worse when higher
        if gap is not None and gap > self.gap_threshold:
            findings.append(f"eval {self.monitor} {gap:.3f} {worse} train (threshold {self.gap_threshold})")
        if drop is not None and drop > self.drop_threshold:
            findings.append(f"eval {self.monitor} {drop:.3f} {worse} its best (threshold {self.drop_threshold})")
        self.streak = self.streak + 1 if findings else 0
        decision = Decision(triggered=self.streak >= self.patience, findings=tuple(findings),
                            eval_before=eval_value, gap=gap, drop=drop)
        return self._act_unless_cooling_down(decision) if decision.triggered else decision

    def judge_probe(self, decision: Decision, eval_mode: float, train_mode: float) -> Decision:
        """Given the metric on training data in eval mode and with batch statistics: when the two agree
        within ``recovery_margin`` the statistics are not stale, so no recalibration; it backs off."""
        if self.worse_by(eval_mode, train_mode) > self.recovery_margin:
            return decision
        self._back_off()
        return decision.noted(f"probe: eval-mode {eval_mode:.3f} vs train-mode {train_mode:.3f} on training "
                              "data, statistics not stale", wants_recalibration=False,
                              diagnosis=Verdict.UNEXPLAINED)

    def judge_recalibration(self, decision: Decision, eval_after: float, *,
                            nonfinite: Sequence[str] = ()) -> Decision:
        """The verdict once the recalibrated model was evaluated again (``nonfinite``: as in :meth:`check`)."""
        if nonfinite:  # fresh statistics did not make the outputs finite
            self._back_off()
            return replace(decision, eval_after=eval_after, diagnosis=Verdict.NONFINITE)
        if not math.isfinite(decision.eval_before):  # corrupt statistics, now repaired
            self._remember(eval_after)
            self.backoff = 1
            return replace(decision, eval_after=eval_after, diagnosis=Verdict.STALE)
        gained = self.worse_by(decision.eval_before, eval_after)
        if gained < -self.recovery_margin:  # keep the statistics eval was better with
            self._back_off()
            return decision.noted(
                f"recalibration made eval {self.monitor} worse ({decision.eval_before:.4f} -> {eval_after:.4f}): "
                "previous statistics restored; are the recalibration batches prepared (transforms, "
                "normalization) like the training batches?", eval_after=eval_after, gained=gained, reverted=True,
                diagnosis=Verdict.WORSE)
        self._remember(eval_after)
        if gained < self.recovery_margin:  # whatever set it off, fresh statistics did not help
            verdict = Verdict.UNEXPLAINED
            self._back_off()
        else:
            verdict = Verdict.STALE
            self.backoff = 1
        return replace(decision, eval_after=eval_after, gained=gained, diagnosis=verdict)

    def _nonfinite(self, eval_value: float, names: tuple[str, ...]) -> Decision:
        finding = f"{', '.join(names)} not finite"
        if any(name.startswith("train_") for name in names):
            return Decision(triggered=True, findings=(finding,), eval_before=eval_value,
                            notes=("the model's own outputs are NaN/Inf, which recalibration cannot fix",),
                            diagnosis=Verdict.NONFINITE)
        return self._act_unless_cooling_down(Decision(triggered=True, findings=(finding,), eval_before=eval_value))

    def _act_unless_cooling_down(self, decision: Decision) -> Decision:
        if self.cooldown > 0:
            self.cooldown -= 1
            return decision.noted(f"backing off ({self.cooldown + 1} evaluation(s) of cooldown left)")
        return replace(decision, wants_recalibration=True)

    def worse_by(self, value: float, reference: float) -> float:
        """How much worse ``value`` is than ``reference`` (positive: worse), whichever direction is better."""
        return reference - value if self.higher_is_better else value - reference

    def _remember(self, value: float) -> None:
        if self.best is None or self.worse_by(value, self.best) < 0:
            self.best = value

    def _back_off(self) -> None:
        self.cooldown = self.backoff
        self.backoff = min(self.backoff * 2, self.max_cooldown)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "cooldown": self.cooldown, "backoff": self.backoff, "streak": self.streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.cooldown, self.backoff = state["best"], state["cooldown"], state["backoff"]
        self.streak = state["streak"]
