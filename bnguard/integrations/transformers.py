"""bnguard's hooks in the Hugging Face ``Trainer``: one ``TrainerCallback`` that carries any list of them.

    trainer = transformers.Trainer(model, args, ..., callbacks=[BNGuardCallback()])

==============================================  ==============================================================
Hugging Face                                    bnguard
==============================================  ==============================================================
``on_train_begin``                              FIT_START (hook state restored when resuming)
``on_epoch_begin``                              EPOCH_START
``on_step_end``                                 STEP_END, then EVAL_START if the Trainer will evaluate now
``on_epoch_end``                                TRAIN_EPOCH_END, then EVAL_START if the Trainer will evaluate
                                                now, else EPOCH_END
``on_evaluate``                                 EVAL_END: the ``metrics`` dict is the hooks' ``eval_metrics``
                                                and takes their re-evaluated values, before the Trainer picks
                                                its best model; EPOCH_END follows an epoch's evaluation
``on_log``                                      (the logged training loss, averaged into ``train_loss``)
``on_save``                                     (hook state written into the checkpoint folder)
``on_train_end``                                FIT_END
==============================================  ==============================================================
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..drivers.runner import HookRunner, checked_hooks
from ..drivers.training_batches import hook_batches
from ..hooks.base import Hook
from ..hooks.events import Event
from ..hooks.trackers import Trackers
from ..recalibration.batches import Forward
from ..recalibration.isolation import preserved_rng
from .common import RunningMeans, hook_state, load_hook_state, missing_extra, warn_never_evaluated, without_evaluation
from .transformers_state import STATE_FILE, hook_state_for
from .transformers_state import trainer_state_digest as _trainer_state_digest

try:
    import transformers
    from transformers.integrations import TensorBoardCallback, WandbCallback
except ImportError as error:  # pragma: no cover - depends on the environment
    raise missing_extra("transformers", "hf") from error



class TransformersTrackers(Trackers):
    """The Trainer's reporting integrations: its W&B run (``report_to="wandb"``), with steps counted as
    ``train/global_step`` as the Trainer counts them, and its TensorBoard writer (``"tensorboard"``).
    Evaluation metrics are named as the Trainer names them (``eval/<name>``). Only process zero logs."""

    def __init__(self, trainer: transformers.Trainer):
        super().__init__(trainer.accelerator)
        self.trainer = trainer

    @property
    def is_main_process(self) -> bool:
        return self.trainer.state.is_world_process_zero

    def _callback(self, kind: type) -> Any:
        return next((cb for cb in self.trainer.callback_handler.callbacks if isinstance(cb, kind)), None)

    def log(self, values: dict[str, Any], step: int) -> None:
        self.log_evaluation(without_evaluation(values), step)

    def log_evaluation(self, values: dict[str, Any], step: int) -> None:
        """Scalars, evaluation metrics included, to W&B and TensorBoard."""
        if not values or not self.is_main_process:
            return
        values = {("eval/" + key.removeprefix("eval_") if key.startswith("eval_") else key): value
                  for key, value in values.items()}
        if self.wandb_run() is not None:
            self.wandb_log(values, step)
        writer = self.tensorboard_writer()
        if writer is not None:
            for key, value in values.items():
                writer.add_scalar(key, value, step)

    def wandb_run(self) -> Any:
        callback = self._callback(WandbCallback)
        return callback._wandb.run if callback is not None and callback._wandb is not None else None

    def wandb_log(self, values: dict[str, Any], step: int) -> None:
        self.wandb_run().log({**values, "train/global_step": step})

    def tensorboard_writer(self) -> Any:
        callback = self._callback(TensorBoardCallback)
        return callback.tb_writer if callback is not None else None


class BNGuardCallback(transformers.TrainerCallback):
    """Runs bnguard ``hooks`` (:class:`~bnguard.BNStatsLogger`, :class:`~bnguard.AutoRecalibrate`,
    :class:`~bnguard.PreciseBN`, your own :class:`~bnguard.Hook`) in a Hugging Face ``Trainer``; the module
    docstring maps the events. Without ``hooks``: a ``BNStatsLogger`` (its overview chart drawn from the loss)
    and an ``AutoRecalibrate`` watching ``eval_loss`` against the training loss (the Trainer computes no
    train accuracy).

    Metric names are the Trainer's: ``eval_loss`` and whatever ``compute_metrics`` returns (``eval_<name>``);
    ``train_loss`` is the mean of the training losses the Trainer logged since the previous evaluation. So
    ``AutoRecalibrate(monitor="accuracy")`` watches ``eval_accuracy`` for falls below its best only.
    Re-evaluation runs the Trainer's own evaluation loop (its ``compute_metrics``, gathered over processes)
    with no callback event fired; the recalibrated metrics are logged at the same ``train/global_step``, and
    ``state.log_history`` (``trainer_state.json``) gets the re-evaluated metrics as a corrected copy of the
    Trainer's eval entry, and the decision as an entry of ``bnguard/`` keys.

    Recalibration batches are fresh shuffles of the training set batched like the Trainer's, or
    ``recalibration_loader`` (any iterable, e.g. for streaming data); ``forward(model, batch)`` runs the model
    on one (default: the batch dict as keyword arguments). Hook state is written into each checkpoint folder
    and read back when the Trainer resumes from it. Every process must run the same hooks.
    """

    def __init__(self, hooks: Iterable[Hook] | None = None, *, recalibration_loader: Iterable[Any] | None = None,
                 forward: Forward | None = None, seed: int = 0):
        if hooks is None:
            from ..hooks.auto_recalibrate import AutoRecalibrate
            from ..hooks.bn_stats import BNStatsLogger

            hooks = [BNStatsLogger(overview_metric="loss"), AutoRecalibrate(monitor="loss", higher_is_better=False)]
        self.hooks = checked_hooks(hooks)  # checked here, where a mistake is made
        self.seed = seed
        self.recalibration_loader, self.forward = recalibration_loader, forward
        self.runner: HookRunner | None = None
        self.trainer: transformers.Trainer | None = None
        self.records: list[dict[str, Any]] = []
        self._batches: Any = None
        self._train = RunningMeans()
        self._epoch_end_pending = self._training = self._in_epoch = self._resumed_mid_epoch = False

    # ---- setting up ------------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module = None, **kwargs: Any) -> None:
        self.trainer = trainer = _calling_trainer()
        if isinstance(trainer.eval_dataset, dict):
            raise ValueError("BNGuardCallback re-evaluates a single eval_dataset, and this Trainer has several")
        self._batches = hook_batches(_batched_like_training(trainer), self.recalibration_loader,
                                     accelerator=trainer.accelerator, seed=self.seed)
        self.runner = HookRunner(self.hooks, accelerator=trainer.accelerator, model=model,
                                 optimizer=kwargs.get("optimizer"),
                                 evaluate=self._reevaluate if trainer.eval_dataset is not None else None,
                                 train_batches=self._batches, forward=self.forward,
                                 trackers=TransformersTrackers(trainer),
                                 evaluation_hint="give the Trainer an eval_dataset")
        self._resumed_mid_epoch = False
        if state.global_step > 0:
            folder = _resumed_folder() or Path(args.output_dir) / f"checkpoint-{state.global_step}"
            saved = hook_state_for(folder, state.global_step, state.is_world_process_zero)
            if saved is not None:
                self.records = load_hook_state(saved, self.runner, self._batches, self._train)
                self._resumed_mid_epoch = bool(saved.get("in_epoch"))
        if str(args.eval_strategy) in ("no", "IntervalStrategy.NO") or trainer.eval_dataset is None:
            warn_never_evaluated(self.hooks, "the Trainer never evaluates (eval_strategy='no' or no eval_dataset)")
        self._training = True
        self.runner.fire(Event.FIT_START, epoch=int(state.epoch or 0), step=state.global_step)

    # ---- training ----------------------------------------------------------------------------------------
    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.runner is None:
            return
        epoch = int(state.epoch or 0)  # the epoch running: a resumed run may be part-way through it
        if self._resumed_mid_epoch:  # its metrics and record so far came back with the hook state
            self._resumed_mid_epoch = False
            self.runner.fire(Event.EPOCH_START, epoch=epoch)
        else:
            self.runner.fire(Event.EPOCH_START, epoch=epoch, record={}, train_metrics={}, eval_metrics={})
        self._in_epoch = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.runner is not None:
            self.runner.fire(Event.STEP_END, step=state.global_step)
            if control.should_evaluate:  # set by the Trainer's flow callback, which runs first
                self.runner.fire(Event.EVAL_START)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if self.runner is not None and logs and "loss" in logs:
            self._train.add("train_loss", logs["loss"])

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.runner is None:
            return
        self.runner.fire(Event.TRAIN_EPOCH_END)
        if control.should_evaluate:
            self._epoch_end_pending = True
            self.runner.fire(Event.EVAL_START)
        else:
            self._end_epoch()

    def _end_epoch(self) -> None:
        self._epoch_end_pending = self._in_epoch = False
        self.runner.fire(Event.EPOCH_END)
        self.records.append(self.runner.state.epoch_record())

    # ---- evaluation --------------------------------------------------------------------------------------
    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                    **kwargs: Any) -> None:
        if self.runner is None or metrics is None or not self._training:
            return
        train = self._train.take() or dict(self.runner.state.train_metrics)  # none logged since: the last ones
        measured = {key: value for key, value in metrics.items()  # not the Trainer's "epoch", a float
                    if key.startswith("eval_") and isinstance(value, (int, float))}
        self.runner.state.record = {}
        self.runner.fire(Event.EVAL_END, step=state.global_step, train_metrics=train, eval_metrics=dict(measured))
        changed = {key: value for key, value in self.runner.state.eval_metrics.items()
                   if key in measured and value != measured[key]}
        metrics.update(changed)  # the same dict the Trainer then picks its best model by
        self.runner.state.trackers.log_evaluation(changed, state.global_step)
        _report_evaluation(state, measured, changed, self.runner.state.record)
        if self._epoch_end_pending:
            self._end_epoch()

    def _reevaluate(self) -> dict[str, float]:
        """The Trainer's evaluation loop run again, its callback events silenced and the global random state
        left as it was (a new loader iterator draws from it, and so would change the next shuffles)."""
        trainer = self.trainer
        with _silenced(trainer.callback_handler), preserved_rng():
            output = trainer.evaluation_loop(trainer.get_eval_dataloader(), description="bnguard re-evaluation",
                                             prediction_loss_only=True if trainer.compute_metrics is None else None,
                                             metric_key_prefix="eval")
        return {key: float(value) for key, value in output.metrics.items() if isinstance(value, (int, float))}

    # ---- checkpoints and the end ---------------------------------------------------------------------------
    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.runner is not None and state.is_world_process_zero:
            self._write_state(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step)

    def _write_state(self, folder: Path, step: int) -> None:
        """The hook state, tied to the checkpoint it belongs to (its step and its trainer_state.json)."""
        saved = {**hook_state(self.runner, self._batches, self.records, self._train), "step": step,
                 "in_epoch": self._in_epoch, "trainer_state_sha256": _trainer_state_digest(folder)}
        partial = folder / (STATE_FILE + ".partial")
        torch.save(saved, partial)
        partial.replace(folder / STATE_FILE)  # whole or absent, never half-written

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.runner is not None:
            self._training, final = False, Path(args.output_dir) / f"checkpoint-{state.global_step}"
            whole_epochs = float(state.epoch or 0).is_integer()  # not a stop part-way through an epoch
            if state.is_world_process_zero and whole_epochs and (final / STATE_FILE).exists():
                self._write_state(final, state.global_step)  # the final checkpoint, with the last epoch's record
            self.runner.fire(Event.FIT_END)


def _report_evaluation(state: Any, measured: dict[str, float], changed: dict[str, float],
                       record: dict[str, Any]) -> None:
    """Says on the console what a recalibration changed (the Trainer has printed what it measured), and adds
    to ``state.log_history`` the re-evaluated metrics as a copy of the Trainer's own entry for this
    evaluation, with the same keys (transformers' model card builds one table from all eval entries and needs
    them alike), then the decision in an entry of its own, under ``bnguard/`` keys, which the Trainer's
    readers pass over."""
    if changed and state.is_world_process_zero:
        shown = ", ".join(f"{key} {value:.4f}" for key, value in changed.items())
        print(f"bnguard: after recalibration {shown} (the eval line above had the stale statistics)", flush=True)
    if changed:
        own = next((entry for entry in reversed(state.log_history)
                    if entry.get("step") == state.global_step and measured.keys() <= entry.keys()), None)
        state.log_history.append({**(own or {"step": state.global_step}), **changed})
    if record:
        state.log_history.append({**{f"bnguard/{key}": value for key, value in record.items()},
                                  "step": state.global_step})


def _resumed_folder() -> Path | None:
    """The checkpoint folder the Trainer is resuming from: a local of its training loop, which is on the call
    stack (the Trainer records it nowhere else)."""
    frame = sys._getframe(1)
    while frame is not None:
        folder = frame.f_locals.get("resume_from_checkpoint")
        if isinstance(frame.f_locals.get("self"), transformers.Trainer) and isinstance(folder, (str, Path)):
            return Path(folder)
        frame = frame.f_back
    return None


def _calling_trainer() -> transformers.Trainer:
    """The Trainer firing the current event. Callbacks are given no reference to it, but every event is
    fired from one of its methods, so it is on the call stack."""
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, transformers.Trainer):
            return candidate
        frame = frame.f_back
    raise RuntimeError("BNGuardCallback runs inside a transformers.Trainer: pass it as Trainer(callbacks=[...])")


def _batched_like_training(trainer: transformers.Trainer) -> Any:
    """A loader over the training set batched as the Trainer batches it on each process; only its dataset,
    batch size and collate function are used, for fresh shuffles."""
    dataset = trainer.train_dataset
    if dataset is None or not hasattr(dataset, "__getitem__"):
        return None  # a stream: hooks that need batches ask for recalibration_loader=
    return DataLoader(dataset, batch_size=trainer.args.per_device_train_batch_size, collate_fn=trainer.data_collator,
                      num_workers=trainer.args.dataloader_num_workers)


@contextmanager
def _silenced(handler: Any) -> Iterator[None]:
    """No callback hears of the re-evaluation's batches: they would count them twice."""
    callbacks, handler.callbacks = handler.callbacks, []
    try:
        yield
    finally:
        handler.callbacks = callbacks

