"""The per-epoch records: the keys bnguard's hooks add, and the ``metrics.jsonl`` file the loop writes."""

from __future__ import annotations

import json
import math
from enum import Enum
from pathlib import Path
from typing import Any


class RecordKeys:
    """Keys that :class:`~bnguard.AutoRecalibrate` and :class:`~bnguard.PreciseBN` add to each epoch's record
    (``state.record``, one line of ``metrics.jsonl``)."""

    RECALIBRATED = "recalibrated"  # whether the statistics were recalibrated at this evaluation
    REASON = "reason"  # why (or why not), in words
    SECONDS = "recal_seconds"  # time spent recalibrating (and re-evaluating)
    SAMPLES = "recal_samples"  # samples the statistics were estimated from, over all processes
    DIAGNOSIS = "diagnosis"  # a bnguard.Verdict value, or None

    @staticmethod
    def before_recal(eval_key: str) -> str:
        """The key of the eval value measured before an automatic recalibration, e.g. ``eval_acc_before_recal``."""
        return f"{eval_key}_before_recal"


class RecordWriter:
    """Appends one JSON line per epoch to ``metrics.jsonl`` on the main process, and echoes it on the
    console when no progress bar shows the run."""

    def __init__(self, path: Path, *, is_main_process: bool, echo: bool):
        self.path, self.is_main_process, self.echo = path, is_main_process, echo

    def open(self, epochs_done: int) -> dict[str, Any]:
        """Keeps the records of the epochs already done (all of them on resume), atomically; returns the last
        of them ({} on a fresh run). Every process reads, the main process writes."""
        kept = []
        if epochs_done and self.path.exists():
            lines = self.path.read_text().splitlines()
            kept = [line for line in lines if line.strip() and json.loads(line)["epoch"] <= epochs_done]
        if self.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_suffix(".jsonl.partial")
            partial.write_text("".join(line + "\n" for line in kept))
            partial.replace(self.path)
        return json.loads(kept[-1]) if kept else {}

    def finished(self, last: dict[str, Any]) -> dict[str, Any]:
        """Says that a resumed run has nothing left to train; returns its last record."""
        if self.is_main_process:
            print(f"bnguard: the run in {self.path.parent} is already complete (epoch {last.get('epoch')}): "
                  "nothing left to train", flush=True)
        return last

    def write_epoch(self, state: Any, seconds: float) -> dict[str, Any]:
        """Writes and returns the record of the epoch just over: the loop's own keys, then the hooks'."""
        record = {"epoch": state.epoch + 1, "step": state.step, **state.train_metrics, **state.eval_metrics,
                  "seconds": seconds, **state.record}
        self.write(record)
        return record

    def write(self, record: dict[str, Any]) -> None:
        if not self.is_main_process:
            return
        with self.path.open("a") as out:
            out.write(json.dumps(_json_safe(record), allow_nan=False) + "\n")
        if self.echo:
            shown = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                             for k, v in record.items() if isinstance(v, (int, float, str)))
            print(shown, flush=True)


def _json_safe(value: Any) -> Any:
    """NaN and Inf as the strings "NaN", "Infinity", "-Infinity": bare NaN is not JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def plain(value: Any) -> Any:
    """``value`` with string enums (``bnguard.Verdict``) as their strings, in nested dicts, lists and tuples."""
    if isinstance(value, Enum) and isinstance(value, str):
        return value.value
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(item) for item in value)
    return value
