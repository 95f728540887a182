"""The runner that fires hooks in list order, in bnguard's drivers and in any loop."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from ..hooks.base import Hook
from ..hooks.events import Event
from ..hooks.state import State
from ..hooks.trackers import Trackers
from ..recalibration.batches import Forward


class HookError(RuntimeError):
    """An exception raised inside a hook, re-raised with the hook and event named."""



class HookRunner:
    """Owns the :class:`State` and fires hooks in list order. ``bnguard.Loop`` uses one; in your own loop::

        runner = bnguard.HookRunner([bnguard.BNStatsLogger()], accelerator=accelerator, model=model,
                                    evaluate=run_eval, train_batches=draw_batches)
        runner.fire(bnguard.Event.STEP_END, step=step)   # keyword arguments update runner.state first

    Two hooks of one class are saved under ``Key#0``, ``Key#1``, in list order. The runner is itself
    checkpointable (``accelerator.register_for_checkpointing(runner)``): its state dict holds every hook's
    state under its key.

    Args:
        hooks: :class:`~bnguard.Hook` s, fired in list order.
        accelerator, model, optimizer: what the hooks see of the run.
        evaluate: returns eval metrics (eval mode).
        train_batches: returns an iterable of training batches for recalibration (e.g.
            :class:`~bnguard.TrainingBatches`).
        forward: ``forward(model, batch)`` runs the model on one (default :func:`~bnguard.default_forward`).
        trackers: where hooks log (default: ``accelerator``'s trackers, see :class:`~bnguard.Trackers`).
        evaluation_hint: tells the user how to give this loop an evaluation, in hooks' errors.
    """

    def __init__(
        self,
        hooks: Iterable[Hook] = (),
        *,
        accelerator: Any = None,
        model: nn.Module | None = None,
        optimizer: Any = None,
        evaluate: Callable[[], dict[str, float]] | None = None,
        train_batches: Callable[[], Iterable[Any]] | None = None,
        forward: Forward | None = None,
        trackers: Trackers | None = None,
        evaluation_hint: str = "pass evaluate= to bnguard.HookRunner",
    ):
        if train_batches is not None and not callable(train_batches):
            raise TypeError(f"train_batches must be a callable giving an iterable of batches, got "
                            f"{type(train_batches).__name__}: pass bnguard.TrainingBatches(loader) (fresh shuffles "
                            "of its dataset) or lambda: loader")
        self.hooks = checked_hooks(hooks)
        seen = Counter(hook.state_key for hook in self.hooks)
        nth: Counter[str] = Counter()
        for hook in self.hooks:
            if seen[hook.state_key] > 1:  # two instances of one class: number them in list order
                key = hook.state_key
                hook.state_key = f"{key}#{nth[key]}"
                nth[key] += 1
        deciding = [hook for hook in self.hooks if hook.writes_decisions]
        for hook in deciding:
            hook.decision_prefix = f"{hook.state_key}/" if len(deciding) > 1 else ""
        self.state = State(accelerator=accelerator, model=model, optimizer=optimizer, evaluate=evaluate,
                           train_batches=train_batches, forward=forward, dispatch=self.fire, trackers=trackers,
                           evaluation_hint=evaluation_hint)

    def fire(self, event: Event | str, **updates: Any) -> None:
        """Updates the state with ``updates``, then calls ``event`` on every hook in order.

        An exception from a hook is re-raised as :class:`HookError` naming it (KeyboardInterrupt as is).
        """
        event = Event(event)
        self.state.update(**updates)
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


def checked_hooks(hooks: Iterable[Hook]) -> list[Hook]:
    """``hooks`` as a list, every one a :class:`Hook`."""
    hooks = list(hooks)
    for hook in hooks:
        if not isinstance(hook, Hook):
            raise TypeError(f"hooks must be bnguard.Hook instances, got {type(hook).__name__}: subclass bnguard.Hook")
    return hooks
