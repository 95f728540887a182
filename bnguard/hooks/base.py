"""The hook protocol: one no-op method per event (see :class:`~bnguard.Event` for when each fires)."""

from __future__ import annotations

from typing import Any

from .state import State


class Hook:
    """Base class: one no-op method per :class:`~bnguard.Event`; override the ones you need.

    A hook that keeps state across a resume overrides :meth:`state_dict` and :meth:`load_state_dict`; it is
    saved under :attr:`state_key`, made unique by :class:`HookRunner` when two hooks would share one.
    """

    acts_at_evaluation = False  # a hook that does its work at evaluations (trainers that never evaluate: a warning)
    writes_decisions = False  # a hook that writes RecordKeys into records (AutoRecalibrate, PreciseBN)
    reevaluates = False  # a hook that may call state.evaluate() (AutoRecalibrate)
    reevaluation_optional = False  # ... and does without when the loop cannot re-evaluate (PreciseBN's check)
    # In front of those keys and of its bnguard/ tracker keys: "" alone, its state_key + "/" beside another
    # such hook, so that neither overwrites the other's (set by HookRunner).
    decision_prefix = ""

    def on_fit_start(self, state: State) -> None:
        """Once, before the first epoch (after a resume's state is loaded)."""

    def on_epoch_start(self, state: State) -> None:
        """At the start of every epoch."""

    def on_step_end(self, state: State) -> None:
        """After every optimizer step."""

    def on_train_epoch_end(self, state: State) -> None:
        """After the last training step of an epoch, before its evaluation."""

    def on_eval_start(self, state: State) -> None:
        """Before an evaluation."""

    def on_eval_end(self, state: State) -> None:
        """After an evaluation, with ``state.eval_metrics`` filled in."""

    def on_epoch_end(self, state: State) -> None:
        """At the end of every epoch, before its record is written."""

    def on_fit_end(self, state: State) -> None:
        """Once, after the last epoch."""

    def on_exception(self, state: State) -> None:
        """When training stops on an error (``state.error``)."""

    def on_recalibrated(self, state: State) -> None:
        """After a hook replaced the running statistics (``state.recalibration``)."""

    @property
    def state_key(self) -> str:
        return getattr(self, "_state_key", None) or type(self).__qualname__

    @state_key.setter
    def state_key(self, key: str) -> None:
        self._state_key = key

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return None
