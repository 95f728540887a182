"""The keys bnguard's recalibrating hooks add to each epoch's record."""

from __future__ import annotations

from typing import Any


class RecordKeys:
    """Keys that :class:`~bnguard.AutoRecalibrate` and :class:`~bnguard.PreciseBN` add to each epoch's record
    (``state.record``, one line of ``metrics.jsonl``)."""

    RECALIBRATED = "recalibrated"  # whether the statistics were recalibrated at this evaluation
    REASON = "reason"  # why (or why not), in words
    SECONDS = "recal_seconds"  # time spent recalibrating (and re-evaluating)
    SAMPLES = "recal_samples"  # samples the statistics were estimated from, over all processes
    DIAGNOSIS = "diagnosis"  # a bnguard.Verdict value, or None
    ERROR_BOUND = "recal_error_bound"  # trackers only: the largest layer's error bound of a recalibration

    @staticmethod
    def before_recal(eval_key: str) -> str:
        """The key of the eval value measured before an automatic recalibration, e.g. ``eval_acc_before_recal``."""
        return f"{eval_key}_before_recal"

    @staticmethod
    def of(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
        """One hook's keys: as they are for the only deciding hook, ``<state_key>/<key>`` beside another
        (``AutoRecalibrate/recalibrated``, ``PreciseBN/recalibrated``)."""
        return {f"{prefix}{key}": value for key, value in values.items()}

    @staticmethod
    def bound(report: Any) -> dict[str, float]:
        """``{ERROR_BOUND: ...}`` of a recalibration's report, or {} when it has no bound."""
        bound = report.error_bound if report is not None else None
        return {RecordKeys.ERROR_BOUND: bound} if bound is not None else {}

    @staticmethod
    def tracked(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
        """The same values under ``bnguard/`` for the trackers (``bnguard/PreciseBN/recalibrated`` beside
        another deciding hook)."""
        return {f"bnguard/{prefix}{key}": value for key, value in values.items()}
