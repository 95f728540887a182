"""Hooks: the base class, the state they see, and the dispatcher that fires them (in any loop)."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .events import Event
from .layers import unwrap_model
from .report import RecalibrationReport


class HookError(RuntimeError):
    """An exception raised inside a hook, re-raised with the hook and event named."""


@dataclass
class State:
    """What hooks see of a training run. Loops update it; hooks read it and call its methods.

    ``record`` is the current epoch's ``metrics.jsonl`` entry: hooks may add keys to it. ``recalibration``
    is the latest :class:`RecalibrationReport`, announced with :meth:`recalibrated`.
    """

    accelerator: Any = None
    model: nn.Module | None = None
    optimizer: Any = None
    epoch: int = 0
    step: int = 0
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    recalibration: RecalibrationReport | None = None
    error: BaseException | None = None
    should_stop: bool = False
    evaluator: Callable[[], dict[str, float]] | None = None
    batch_source: Callable[[], Iterable[Any]] | None = None
    dispatch: Callable[[Event], None] | None = None

    @property
    def unwrapped_model(self) -> nn.Module:
        return unwrap_model(self.model)

    @property
    def is_main_process(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def log(self, values: dict[str, Any]) -> None:
        """Sends values to every tracker once (main process only), at the current global step."""
        if self.accelerator is not None:
            self.accelerator.log(values, step=self.step)

    def evaluate(self) -> dict[str, float]:
        """Re-runs evaluation (eval mode) and returns its metrics; fires no event."""
        if self.evaluator is None:
            raise RuntimeError("this loop gave its hooks no evaluate function: pass evaluate= to bnguard.Hooks")
        return self.evaluator()

    def train_batches(self) -> Iterable[Any]:
        """Training batches for recalibration, drawn without disturbing the training data order or RNG."""
        if self.batch_source is None:
            raise RuntimeError("this loop gave its hooks no training batches: pass train_batches= to bnguard.Hooks")
        return self.batch_source()

    def recalibrated(self, report: RecalibrationReport) -> None:
        """Announces new running statistics: sets ``recalibration`` and fires RECALIBRATED to every hook."""
        self.recalibration = report
        if self.dispatch is not None:
            self.dispatch(Event.RECALIBRATED)

    def request_stop(self) -> None:
        """Asks the loop to stop after the current step."""
        self.should_stop = True


class Hook:
    """Base class: one no-op method per :class:`~bnguard.Event`; override the ones you need.

    A hook that keeps state across a resume overrides :meth:`state_dict` and :meth:`load_state_dict`; it is
    saved under :attr:`state_key`, made unique by :class:`Hooks` when two hooks would share one.
    """

    def on_fit_start(self, state: State) -> None: ...

    def on_epoch_start(self, state: State) -> None: ...

    def on_step_end(self, state: State) -> None: ...

    def on_train_epoch_end(self, state: State) -> None: ...

    def on_eval_start(self, state: State) -> None: ...

    def on_eval_end(self, state: State) -> None: ...

    def on_epoch_end(self, state: State) -> None: ...

    def on_fit_end(self, state: State) -> None: ...

    def on_exception(self, state: State) -> None: ...

    def on_recalibrated(self, state: State) -> None: ...

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


class Hooks:
    """Fires hooks in list order. Use it in your own loop::

        hooks = bnguard.Hooks([bnguard.BNStatsLogger()], accelerator=accelerator, model=model,
                              evaluate=run_eval, train_batches=lambda: train_loader)
        hooks.fire(bnguard.Event.STEP_END, step=step)   # keyword arguments update hooks.state first

    It is itself checkpointable (``accelerator.register_for_checkpointing(hooks)``): its state dict holds every
    hook's state under its key.
    """

    def __init__(
        self,
        hooks: Iterable[Hook] = (),
        *,
        evaluate: Callable[[], dict[str, float]] | None = None,
        train_batches: Callable[[], Iterable[Any]] | None = None,
        **state: Any,
    ):
        self.hooks = list(hooks)
        for hook in self.hooks:
            if not isinstance(hook, Hook):
                raise TypeError(
                    f"hooks must be bnguard.Hook instances, got {type(hook).__name__}: subclass bnguard.Hook"
                )
        seen = Counter(hook.state_key for hook in self.hooks)
        nth: Counter[str] = Counter()
        for hook in self.hooks:
            if seen[hook.state_key] > 1:  # two instances of one class: number them in list order
                key = hook.state_key
                hook.state_key = f"{key}#{nth[key]}"
                nth[key] += 1
        self.state = State(evaluator=evaluate, batch_source=train_batches, dispatch=self.fire, **state)

    def fire(self, event: Event | str, **updates: Any) -> None:
        """Updates the state with ``updates``, then calls ``event`` on every hook in order.

        An exception from a hook is re-raised as :class:`HookError` naming it (KeyboardInterrupt as is).
        """
        event = Event(event)
        for name, value in updates.items():
            if not hasattr(self.state, name):
                raise AttributeError(f"bnguard.State has no field {name!r}")
            setattr(self.state, name, value)
        for hook in self.hooks:
            try:
                getattr(hook, event.value)(self.state)
            except HookError:
                raise
            except Exception as error:
                raise HookError(f"hook {hook.state_key} failed in {event.value}: {error!r}") from error

    def fire_exception(self, error: BaseException) -> None:
        """Tells every hook about ``error``; a hook failing here cannot hide the original error."""
        self.state.error = error
        for hook in self.hooks:
            try:
                hook.on_exception(self.state)
            except Exception as failure:  # noqa: BLE001 - the error being reported matters more
                warnings.warn(f"hook {hook.state_key} failed in on_exception: {failure!r}", stacklevel=2)

    def state_dict(self) -> dict[str, Any]:
        return {hook.state_key: hook.state_dict() for hook in self.hooks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = [hook.state_key for hook in self.hooks if hook.state_key not in state_dict]
        if missing:
            raise KeyError(f"checkpoint holds no state for hook(s) {missing}: were the same hooks used?")
        for hook in self.hooks:
            hook.load_state_dict(state_dict[hook.state_key])
