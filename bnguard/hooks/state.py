"""The one view of a training run that hooks get, in bnguard's own loop and in any other."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torch import nn

from ..recalibration.batches import Forward
from ..recalibration.isolation import isolated_iteration, preserved_modes, preserved_rng
from ..recalibration.layers import unwrap_model
from ..recalibration.report import RecalibrationReport
from .events import Event
from .trackers import Trackers

NO_TRAIN_BATCHES = ("pass train_batches= to bnguard.HookRunner, or recalibration_loader= to bnguard.Loop (a "
                    "streaming training set cannot be reshuffled)")


class State:
    """What hooks see of a training run. Loops update it (through :meth:`HookRunner.fire`); hooks read it
    and call its methods.

    Epochs are counted from 0: ``epoch`` is the index of the epoch running, as in ``range(epochs)`` (at
    FIT_END, and at FIT_START of a resumed run, the last one run). Records, console lines and checkpoint
    folders name an epoch once it is over by how many epochs are then done: ``epoch + 1``. ``step`` counts
    optimizer steps over the whole run. ``record`` is the current epoch's ``metrics.jsonl`` entry: hooks may
    add keys to it. ``recalibration`` is the latest :class:`RecalibrationReport`, announced with
    :meth:`recalibrated`.
    """

    UPDATABLE = frozenset({"model", "optimizer", "epoch", "step", "train_metrics", "eval_metrics", "record"})

    def __init__(
        self,
        *,
        accelerator: Any = None,
        model: nn.Module | None = None,
        optimizer: Any = None,
        evaluate: Callable[[], dict[str, float]] | None = None,
        train_batches: Callable[[], Iterable[Any]] | None = None,
        forward: Forward | None = None,
        dispatch: Callable[[Event], None] | None = None,
        trackers: Trackers | None = None,
        evaluation_hint: str = "pass evaluate= to bnguard.HookRunner",
    ):
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.epoch = 0
        self.step = 0
        self.train_metrics: dict[str, float] = {}
        self.eval_metrics: dict[str, float] = {}
        self.record: dict[str, Any] = {}
        self.recalibration: RecalibrationReport | None = None
        self.error: BaseException | None = None
        self.should_stop = False
        self._evaluate, self._train_batches, self._dispatch = evaluate, train_batches, dispatch
        self.forward = forward  # how a batch reaches the model, for hooks that run it (None: the default)
        self.trackers = trackers or Trackers(accelerator)  # where hooks' values go
        self.evaluation_hint = evaluation_hint  # how this loop's user gives it an evaluation, for errors
        self.cannot_reevaluate: str | None = None  # why the loop's evaluation cannot run again, once known

    def update(self, **values: Any) -> None:
        """Sets fields the loop owns (:attr:`UPDATABLE`); an unknown name is an error, not a new attribute."""
        for name, value in values.items():
            if name not in self.UPDATABLE:
                raise AttributeError(f"bnguard.State has no field {name!r} to update: use one of "
                                     f"{', '.join(sorted(self.UPDATABLE))}")
            setattr(self, name, value)

    @property
    def unwrapped_model(self) -> nn.Module:
        return unwrap_model(self.model)

    @property
    def is_main_process(self) -> bool:
        return self.trackers.is_main_process

    @property
    def has_evaluation(self) -> bool:
        """Whether :meth:`evaluate` can run: the loop gave an evaluate function."""
        return self._evaluate is not None

    @property
    def has_train_batches(self) -> bool:
        """Whether :meth:`train_batches` can run: the loop gave a source of training batches."""
        return self._train_batches is not None

    def log(self, values: dict[str, Any]) -> None:
        """Sends values to every tracker once (main process only), at the current global step."""
        if self.trackers.is_main_process:
            self.trackers.log(values, self.step)

    def evaluate(self) -> dict[str, float]:
        """Re-runs evaluation (eval mode) and returns its metrics; fires no event. The global random states
        and the modes of the model's modules are restored afterwards: an evaluate function that builds a
        loader iterator draws from the global stream, and the run must train on the same batches and dropout
        masks whether or not a hook re-evaluated."""
        if self._evaluate is None:
            raise RuntimeError(f"this loop gave its hooks no evaluate function: {self.evaluation_hint}")
        if self.cannot_reevaluate is not None:
            raise RuntimeError(f"this loop's evaluation cannot run again: {self.cannot_reevaluate}")
        with preserved_modes(self.model), preserved_rng():
            return self._evaluate()

    def train_batches(self) -> Iterator[Any]:
        """Training batches for recalibration, drawn on a random stream of their own: the training data order
        and the global random states are left as they were."""
        if self._train_batches is None:
            raise RuntimeError(f"this loop gave its hooks no training batches: {NO_TRAIN_BATCHES}")
        return isolated_iteration(self._train_batches)

    def recalibrated(self, report: RecalibrationReport) -> None:
        """Announces new running statistics: sets ``recalibration`` and fires RECALIBRATED to every hook."""
        self.recalibration = report
        if self._dispatch is not None:
            self._dispatch(Event.RECALIBRATED)

    def request_stop(self) -> None:
        """Asks the loop to stop after the current step."""
        self.should_stop = True

    def epoch_record(self) -> dict[str, Any]:
        """The record of the epoch just over, as ``metrics.jsonl`` holds it: epochs done, step, the train and
        eval metrics, then the hooks' keys."""
        return {"epoch": self.epoch + 1, "step": self.step, **self.train_metrics, **self.eval_metrics, **self.record}

    def state_dict(self) -> dict[str, int]:
        """Where the run is, for checkpoints: the epoch index and the global step."""
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.step = state["epoch"], state["step"]
