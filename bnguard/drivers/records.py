"""The per-epoch records: the ``metrics.jsonl`` file the loop writes, and plain values for it."""

from __future__ import annotations

import json
import math
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


class RecordWriter:
    """Appends one JSON line per epoch to ``metrics.jsonl`` on the main process, and echoes it on the
    console (above the progress bar, when one shows the run). :attr:`records` holds what was written, for the copy each
    checkpoint keeps (``records.json``), from which a damaged file is rewritten on resume."""

    def __init__(self, path: Path, *, is_main_process: bool):
        self.path, self.is_main_process = path, is_main_process
        self.records: list[dict[str, Any]] = []

    def open(self, epochs_done: int, copy: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Keeps the records of the epochs already done (all of them on resume), atomically; returns the last
        of them ({} on a fresh run). ``copy``: the resumed checkpoint's own records, which replace the file's
        when its lines are torn, damaged or missing (a crash mid-write leaves a torn last line). Every process
        reads, the main process writes."""
        kept = self._readable(epochs_done) if epochs_done else []
        if copy is not None and kept != copy:
            if self.is_main_process:
                warnings.warn(f"{self.path} does not hold the records of the {epochs_done} epochs done (torn, "
                              "damaged or missing lines): rewritten from the checkpoint's own copy", stacklevel=4)
            kept = list(copy)
        if self.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_suffix(".jsonl.partial")
            partial.write_text("".join(json.dumps(_json_safe(r), allow_nan=False) + "\n" for r in kept))
            partial.replace(self.path)
        self.records = kept
        return kept[-1] if kept else {}

    def _readable(self, epochs_done: int) -> list[dict[str, Any]]:
        """The file's records of epochs up to ``epochs_done``; each damaged line is named in a warning."""
        if not self.path.exists():
            return []
        kept, damaged = [], []
        for number, line in enumerate(self.path.read_bytes().decode("utf-8", "replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                epoch = record["epoch"]
            except (ValueError, TypeError, KeyError):
                damaged.append(number)
                continue
            if epoch <= epochs_done:
                kept.append(record)
        if damaged and self.is_main_process:
            warnings.warn(f"{self.path}: line(s) {damaged} are not records (a write cut by a crash?): left out",
                          stacklevel=5)
        return kept

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
        self.records.append(json.loads(json.dumps(_json_safe(record), allow_nan=False)))  # as read back
        if not self.is_main_process:
            return
        with self.path.open("a") as out:
            out.write(json.dumps(_json_safe(record), allow_nan=False) + "\n")
        shown = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in record.items() if isinstance(v, (int, float, str)))
        tqdm.write(shown)  # plain print without a bar; above it, not through it, with one
        sys.stdout.flush()


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
