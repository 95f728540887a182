"""The events of a loop that says only "a step happened" and "an evaluation happened": which of FIT_START,
EPOCH_START, TRAIN_EPOCH_END and EPOCH_END each call implies, and the record of every epoch."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..hooks.events import Event
from .records import plain
from .runner import HookRunner
from .train_counts import TrainCounts


@dataclass
class Progress:
    """Where the loop stands between calls: what has fired, and which epoch comes next."""

    started: bool = False  # FIT_START fired by this process (a resumed run fires it again)
    ended: bool = False
    explicit_epochs: bool = False  # epochs follow start(), not the evaluations
    epoch_open: bool = False
    train_epoch_ended: bool = False
    next_epoch: int = 0


class EpochEvents:
    """Fires the epoch-level events around a hand-written loop's steps and evaluations: each evaluation ends
    an epoch, unless :meth:`start` marks the epochs. Keeps each finished epoch's record."""

    def __init__(self, runner: HookRunner, train_counts: TrainCounts):
        self.runner, self.state, self.train_counts = runner, runner.state, train_counts
        self.progress = Progress()
        self.records: list[dict[str, Any]] = []

    def open(self) -> None:
        """FIT_START at the first call, and EPOCH_START when no epoch is open (epochs not marked)."""
        if not self.progress.started:
            self.progress.started = True
            self.runner.fire(Event.FIT_START)
        if not self.progress.epoch_open and not self.progress.explicit_epochs:
            self._open_epoch(self.progress.next_epoch)

    def start(self, epoch: int | None) -> None:
        """An epoch marked by the loop: the open one ends, ``epoch`` (default the next) begins."""
        self.progress.explicit_epochs = True
        self.open()
        self._close_epoch()
        self._open_epoch(epoch if epoch is not None else self.progress.next_epoch)

    def before_evaluation(self) -> dict[str, Any]:
        """Ends the train part of the epoch when the evaluation ends it; returns the state updates for
        EVAL_START (mid-epoch: the train metrics so far)."""
        self.open()
        if not self.progress.epoch_open:  # epochs are marked, and none was started yet
            self._open_epoch(self.progress.next_epoch)
        if self.progress.explicit_epochs:
            return {"train_metrics": self.train_counts.metrics()}
        self._end_train_epoch()
        return {}

    def after_evaluation(self) -> None:
        if not self.progress.explicit_epochs:
            self._close_epoch()

    def end(self) -> None:
        """The last epoch ends, and FIT_END fires, once."""
        if self.progress.started and not self.progress.ended:
            self._close_epoch()
            self.progress.ended = True
            self.runner.fire(Event.FIT_END)

    def _open_epoch(self, epoch: int) -> None:
        self.progress.epoch_open, self.progress.train_epoch_ended = True, False
        self.train_counts.reset()
        self.runner.fire(Event.EPOCH_START, epoch=epoch, record={}, train_metrics={}, eval_metrics={})

    def _end_train_epoch(self) -> None:
        self.progress.train_epoch_ended = True
        self.runner.fire(Event.TRAIN_EPOCH_END, train_metrics=self.train_counts.metrics())
        self.state.log({**self.state.train_metrics, "epoch": self.state.epoch})

    def _close_epoch(self) -> None:
        if not self.progress.epoch_open:
            return
        if not self.progress.train_epoch_ended:
            self._end_train_epoch()
        state = self.state
        self.runner.fire(Event.EPOCH_END)
        self.records.append(plain(state.epoch_record()))
        self.progress.epoch_open, self.progress.next_epoch = False, state.epoch + 1

    def state_dict(self) -> dict[str, Any]:
        """Progress, records and the open epoch's sums and metrics (a checkpoint may fall mid-epoch)."""
        state = self.state
        return {"progress": {k: v for k, v in asdict(self.progress).items() if k != "started"},
                "records": list(self.records), "train_counts": self.train_counts.state_dict(),
                "train_metrics": dict(state.train_metrics), "eval_metrics": dict(state.eval_metrics),
                "record": dict(state.record)}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.progress = Progress(started=self.progress.started, **saved["progress"])
        self.records = list(saved["records"])
        self.train_counts.load_state_dict(saved["train_counts"])
        self.state.update(train_metrics=dict(saved["train_metrics"]), eval_metrics=dict(saved["eval_metrics"]),
                          record=dict(saved["record"]))
