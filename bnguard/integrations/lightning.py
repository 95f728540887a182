"""bnguard's hooks in PyTorch Lightning: one ``Callback`` that carries any list of them.

    trainer = lightning.Trainer(callbacks=[BNGuardCallback([BNStatsLogger(), AutoRecalibrate()])],
                                logger=WandbLogger(offline=True))

=================================  ==========================================================================
Lightning                          bnguard
=================================  ==========================================================================
``on_train_start``                 FIT_START (loaders built, model on its device, checkpoint restored)
``on_train_epoch_start``           EPOCH_START
``on_train_batch_end``             STEP_END, once per optimizer step (``state.step`` is ``global_step``)
``on_validation_start``            EVAL_START (model in eval mode; sanity checks are skipped)
``on_validation_epoch_end``        EVAL_END: ``val_<name>`` metrics as ``eval_<name>``; a changed one is
                                   logged back under its own name, so loggers, ``ModelCheckpoint`` and
                                   ``EarlyStopping`` read the recalibrated value
``on_train_epoch_end``             TRAIN_EPOCH_END, then EPOCH_END
``on_fit_end`` / ``on_exception``  FIT_END / EXCEPTION
=================================  ==========================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..drivers.runner import HookRunner, checked_hooks
from ..drivers.training_batches import hook_batches
from ..hooks.base import Hook
from ..hooks.events import Event
from ..hooks.trackers import Trackers
from ..recalibration.batches import Forward
from ..recalibration.batches import batch_size as batch_size_of
from ..recalibration.isolation import preserved_rng, restore_statistics, saved_statistics
from .common import RunningMeans, hook_state, load_hook_state, missing_extra, warn_never_evaluated, without_evaluation

try:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
except ImportError as error:  # pragma: no cover - depends on the environment
    raise missing_extra("lightning", "lightning") from error


class LightningTrackers(Trackers):
    """The trainer's loggers: scalars to every one of them (``log_metrics``), histograms and tables to its
    ``WandbLogger`` run and its ``TensorBoardLogger`` writer. Evaluation metrics are left to the callback,
    which logs them through Lightning itself. Only global rank 0 logs."""

    def __init__(self, trainer: pl.Trainer):
        super().__init__()
        self.trainer = trainer

    @property
    def is_main_process(self) -> bool:
        return self.trainer.is_global_zero

    def log(self, values: dict[str, Any], step: int) -> None:
        values = without_evaluation(values)
        if values and self.is_main_process:
            for logger in self.trainer.loggers:
                logger.log_metrics(values, step)

    def _logger(self, kind: type) -> Any:
        return next((logger for logger in self.trainer.loggers if isinstance(logger, kind)), None)

    def wandb_run(self) -> Any:
        logger = self._logger(WandbLogger)
        return logger.experiment if logger is not None and self.is_main_process else None

    def wandb_log(self, values: dict[str, Any], step: int) -> None:
        self._logger(WandbLogger).log_metrics(values, step)  # at Lightning's trainer/global_step

    def tensorboard_writer(self) -> Any:
        logger = self._logger(TensorBoardLogger)
        return logger.experiment if logger is not None and self.is_main_process else None


class BNGuardCallback(pl.Callback):
    """Runs bnguard ``hooks`` (:class:`~bnguard.BNStatsLogger`, :class:`~bnguard.AutoRecalibrate`,
    :class:`~bnguard.PreciseBN`, your own :class:`~bnguard.Hook`) in a Lightning ``Trainer``; the module
    docstring maps the events.

    Metric names: what the LightningModule logs as ``val_<name>`` (``val_prefix``) in ``validation_step`` is
    ``eval_<name>`` to the hooks, and what it logs as ``train_<name>`` on training steps is averaged over
    each epoch's steps into ``train_<name>``; so ``AutoRecalibrate(monitor="acc")`` compares ``val_acc``
    with ``train_acc``. Re-evaluation after a recalibration runs the module's ``validation_step`` over the
    validation loaders again with its ``self.log`` calls collected (batch-size-weighted means, summed over
    processes), and fires no Lightning event.

    Recalibration batches are fresh shuffles of the training loader's dataset moved by the strategy, or
    ``recalibration_loader`` (any iterable, e.g. for streaming data); ``forward(module, batch)`` runs the
    module on one (default: a tuple's first element, a dict as keyword arguments). Hook state is saved in
    Lightning's checkpoints. Every process must run the same hooks.
    """

    def __init__(self, hooks: Iterable[Hook] = (), *, val_prefix: str = "val_",
                 recalibration_loader: Iterable[Any] | None = None, forward: Forward | None = None, seed: int = 0):
        self.hooks = checked_hooks(hooks)  # checked here, where a mistake is made
        self.val_prefix, self.seed = val_prefix, seed
        self.recalibration_loader, self.forward = recalibration_loader, forward
        self.records: list[dict[str, Any]] = []
        self.runner: HookRunner | None = None
        self._batches: Any = None
        self._train = RunningMeans()
        self._restored: dict[str, Any] | None = None
        self._pending_eval = False
        self._watch: FirstValidationWatch | None = None  # set at the first validation

    # ---- setting up ------------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        train_loader = None if self.recalibration_loader is not None else _single_loader(trainer.train_dataloader)
        self._batches = hook_batches(train_loader, self.recalibration_loader, accelerator=None, seed=self.seed)
        self.runner = HookRunner(self.hooks, model=pl_module, optimizer=trainer.optimizers[0] if trainer.optimizers
                                 else None, evaluate=lambda: self._revalidate(trainer, pl_module),
                                 train_batches=self._moved_batches(trainer) if self._batches else None,
                                 forward=self.forward, trackers=LightningTrackers(trainer),
                                 evaluation_hint="give the LightningModule a validation_step and the Trainer "
                                 "validation data")
        if self._restored is not None:
            self.records = load_hook_state(self._restored, self.runner, self._batches, self._train)
        if not _validates(trainer, pl_module):
            warn_never_evaluated(self.hooks, "the LightningModule has no validation_step, or the Trainer runs no "
                                 "validation batch (limit_val_batches=0)")
        self.runner.fire(Event.FIT_START, epoch=trainer.current_epoch, step=trainer.global_step)

    def _moved_batches(self, trainer: pl.Trainer) -> Callable[[], Iterator[Any]]:
        def draw() -> Iterator[Any]:
            for batch in self._batches():
                yield trainer.strategy.batch_to_device(batch)
        return draw

    # ---- training ----------------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.runner is not None:
            self.runner.fire(Event.EPOCH_START, epoch=trainer.current_epoch, record={}, train_metrics={},
                             eval_metrics={})

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.runner is None:
            return
        for name, value in trainer.callback_metrics.items():
            if name.startswith("train_") and not name.endswith("_epoch"):
                self._train.add(name.removesuffix("_step"), value)
        if trainer.global_step != self.runner.state.step:  # an optimizer step happened
            self.runner.fire(Event.STEP_END, step=trainer.global_step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.runner is None:
            return
        state = self.runner.state
        self.runner.fire(Event.TRAIN_EPOCH_END, train_metrics={**state.train_metrics, **self._train.take()})
        self.runner.fire(Event.EPOCH_END)
        self.records.append(state.epoch_record())

    # ---- evaluation --------------------------------------------------------------------------------------
    def _evaluating(self, trainer: pl.Trainer) -> bool:
        return self.runner is not None and not trainer.sanity_checking and trainer.state.fn == "fit"

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._evaluating(trainer):
            self._pending_eval = True
            if self._watch is None and any(hook.reevaluates for hook in self.hooks):
                self._watch = FirstValidationWatch(pl_module, self.val_prefix)
            self.runner.fire(Event.EVAL_START, step=trainer.global_step)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self._evaluating(trainer) and self._pending_eval):
            return
        self._pending_eval = False
        if self._watch is not None:  # the first validation's, before any hook acts on it
            self._watch.end(self.hooks, self.runner.state)
        measured = self._eval_metrics(trainer)
        train = {**self.runner.state.train_metrics, **self._train.means()}  # Lightning validates mid-epoch
        self.runner.fire(Event.EVAL_END, step=trainer.global_step, train_metrics=train, eval_metrics=dict(measured))
        for key, value in self.runner.state.eval_metrics.items():
            if key in measured and value != measured[key]:  # the hooks re-evaluated: Lightning reads the new value
                name = self.val_prefix + key.removeprefix("eval_")
                pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=True,
                              prog_bar=name in trainer.progress_bar_metrics)  # the bar shows the new value too

    def _eval_metrics(self, trainer: pl.Trainer) -> dict[str, float]:
        """``val_<name>`` as ``eval_<name>``, averaged over processes so that every process decides alike."""
        means = RunningMeans()
        for name, value in trainer.callback_metrics.items():
            if name.startswith(self.val_prefix) and not name.endswith("_step"):
                means.add("eval_" + name.removeprefix(self.val_prefix).removesuffix("_epoch"), value)
        return means.take()

    def _revalidate(self, trainer: pl.Trainer, module: pl.LightningModule) -> dict[str, float]:
        """The module's validation metrics measured again, without firing any Lightning event or drawing from
        the global random state (a new loader iterator would, and so change the next shuffles)."""
        loaders = trainer.val_dataloaders
        loaders = list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
        logged = RunningMeans()
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad(), preserved_rng(), _collecting_logs(module, logged) as current_batch:
                for index, loader in enumerate(loaders):
                    for batch_index, batch in enumerate(loader):
                        current_batch[0] = batch = trainer.strategy.batch_to_device(batch)
                        module.validation_step(batch, batch_index, *((index,) if len(loaders) > 1 else ()))
        finally:
            module.train(was_training)
        return {"eval_" + name.removeprefix(self.val_prefix): value
                for name, value in logged.take().items() if name.startswith(self.val_prefix)}

    # ---- end of training ---------------------------------------------------------------------------------
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.runner is not None:
            self.runner.fire(Event.FIT_END)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.runner is not None:
            self.runner.fire_exception(exception)

    # ---- checkpointing -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.runner is None:  # not trained in this process (a finished run relaunched): what was loaded
            return self._restored or {}
        return hook_state(self.runner, self._batches, self.records, self._train)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict or None  # the hooks' part is applied at on_train_start, once they are wired
        if self._restored is not None:
            self.records = list(self._restored["records"])


class FirstValidationWatch:
    """The first validation, watched: the module's ``self.log`` calls pass through to Lightning while the
    validation metrics logged as torchmetrics objects are noted (a re-evaluation cannot measure them, their
    state is Lightning's to compute), and the statistics before it are kept, to be put back when a hook that
    must re-evaluate is refused (another may have recalibrated at the validation's start)."""

    def __init__(self, module: pl.LightningModule, prefix: str):
        self.module, self.seen, self.before = module, [], saved_statistics(module)
        self.ended = False
        logging = module.log

        def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            if name.startswith(prefix) and _is_metric_object(value) and name not in self.seen:
                self.seen.append(name)
            logging(name, value, *args, **kwargs)

        module.log = log  # on this instance only; removed at the end of the validation

    def end(self, hooks: list[Hook], state: Any) -> None:
        """Ends the watch. With metric objects seen, hooks that must re-evaluate are refused, naming them, the
        statistics as before; those that do without are told (``state.cannot_reevaluate``)."""
        if self.ended:
            return
        self.ended = True
        del self.module.log
        before, self.before = self.before, None  # needed only now
        if not self.seen:
            return
        state.cannot_reevaluate = (
            f"the LightningModule logs {', '.join(map(repr, self.seen))} as torchmetrics object(s), which a "
            f"re-evaluation cannot measure: log the value instead, e.g. self.log({self.seen[0]!r}, "
            "self.metric(preds, target)) (Lightning averages it over the batches)")
        needing = [hook.state_key for hook in hooks if hook.reevaluates and not hook.reevaluation_optional]
        if needing:
            restore_statistics(before)
            raise ValueError(f"{', '.join(needing)} evaluates again after a recalibration, and "
                             f"{state.cannot_reevaluate}; or leave {', '.join(needing)} out. The statistics are "
                             "as they were before this validation.")


def _is_metric_object(value: Any) -> bool:
    return hasattr(value, "compute") and hasattr(value, "reset") and hasattr(value, "update")


def _validates(trainer: pl.Trainer, module: pl.LightningModule) -> bool:
    """Whether this fit will run validation at all."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    return is_overridden("validation_step", module) and trainer.limit_val_batches != 0


def _single_loader(loaders: Any) -> Any:
    """The training loader, when Lightning has exactly one."""
    if isinstance(loaders, dict) or isinstance(loaders, (list, tuple)):
        raise TypeError("BNGuardCallback draws recalibration batches from a single training loader, and this "
                        "trainer has several: pass recalibration_loader= to BNGuardCallback")
    return loaders


@contextmanager
def _collecting_logs(module: pl.LightningModule, logged: RunningMeans) -> Iterator[list[Any]]:
    """The module's ``self.log`` (and ``log_dict``, which calls it) adds to ``logged`` instead of Lightning's
    results, weighted by the size of the batch the caller puts in the yielded list, as Lightning weights its
    epoch means."""
    current_batch: list[Any] = [None]

    def collect(name: str, value: Any, *args: Any, reduce_fx: Any = "mean", batch_size: int | None = None,
                **kwargs: Any) -> None:
        if reduce_fx not in ("mean", torch.mean):
            raise ValueError(f"bnguard re-evaluates logged means only, and {name!r} is logged with "
                             f"reduce_fx={reduce_fx!r}: log it with the default mean")
        if _is_metric_object(value):  # a torchmetrics Metric updated by the step
            raise ValueError(f"bnguard cannot re-evaluate {name!r}, logged as a torchmetrics object: log its "
                             "value (metric(preds, target)) instead")
        logged.add(name, value, batch_size or batch_size_of(current_batch[0], required=False) or 1)

    module.log = collect  # shadows the method on this instance only
    try:
        yield current_batch
    finally:
        del module.log

