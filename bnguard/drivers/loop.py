"""An Accelerate training loop that fires :class:`~bnguard.Event` s to hooks."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..hooks.base import Hook
from ..hooks.events import Event
from ..hooks.state import State
from ..recalibration.batches import Forward, accuracy, batch_targets, default_forward, logits_of
from ..recalibration.layers import frozen_the_finetuning_way, train_keeping_frozen
from ..utils.console import show_progress
from ..utils.validation import positive_int
from .checkpoint import Checkpoints, records_copy, resolve_checkpoint
from .metrics import Metric, MetricSums, NonFiniteLossError, evaluate_classifier
from .records import RecordWriter
from .run_dir import shared_output_dir
from .runner import HookRunner, checked_hooks
from .schedule import Schedule
from .tracker_setup import finish, start_trackers, tracker_names
from .train_step import ComputeLoss, TrainStep, loss_of
from .training_batches import hook_batches


class Loop:
    """Trains a classifier with Accelerate and fires events to hooks, in the order documented in
    :class:`bnguard.Event`. Objects are prepared at construction (``loop.model`` is the prepared model);
    :meth:`fit` trains, writing ``metrics.jsonl`` (one JSON line per epoch), tracker files and checkpoints.

    Args:
        model, optimizer, train_loader: what to train, unprepared; batches are ``(inputs, targets)`` or dicts
            with ``labels``. eval_loader: evaluated every epoch unless ``eval_every_*`` say otherwise.
        loss_fn, forward, compute_loss: ``loss_fn(logits, targets)``, the batch mean (default cross-entropy);
            ``forward(model, batch)`` (default :func:`~bnguard.default_forward`, also used by the hooks);
            ``compute_loss(model, batch) -> (loss, outputs)`` (default ``loss_fn`` on ``forward``'s logits;
            :func:`~bnguard.loss_from_model` for models that compute their own loss).
        scheduler, hooks: stepped after every optimizer step; :class:`~bnguard.Hook` s, fired in list order.
        accelerator: default: one from the Accelerate config with ``gradient_accumulation_steps`` and a
            seedable sampler, so that a resumed run draws the same batches.
        epochs, max_steps: when to stop, whichever comes first (at least one).
        gradient_accumulation_steps, max_grad_norm: batches per optimizer step; gradient clipping norm.
        eval_every_epochs, eval_every_steps: the evaluation schedule (one or the other).
        log_every_steps, limit_train_batches: train metrics logged every N steps; at most N batches an epoch.
        checkpoint_every_epochs: ``output_dir/checkpoints/epoch-NNNN`` every this many epochs and at the end.
        output_dir: default ``runs/<timestamp>``, the same folder on every process.
        tracker: "wandb", "tensorboard", "mlflow", "aim", "all" (W&B and TensorBoard), "none", or a list
            (default: ``log_with``); W&B offline without a key; MLflow where MLFLOW_TRACKING_URI points.
        project, run_name, config: the trackers' project and run name, and extra values for the run config.
        metric, metric_name: per-sample ``metric(logits, targets)`` (default accuracy) as ``*_<metric_name>``.
        recalibration_loader: batches for hooks to recalibrate on, streams too (default: training set shuffles).
        seed, progress: seeds the training batches drawn for hooks; show a progress bar on a terminal.
    BatchNorm layers in eval mode in a model given in train mode (frozen for fine-tuning) stay in eval mode.
    """

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, train_loader: DataLoader, *,
        eval_loader: DataLoader | None = None, loss_fn: Callable[..., torch.Tensor] = F.cross_entropy,
        scheduler: Any = None, accelerator: Accelerator | None = None, hooks: Iterable[Hook] = (),
        epochs: int | None = None, max_steps: int | None = None, gradient_accumulation_steps: int = 1,
        max_grad_norm: float | None = None, eval_every_epochs: int | None = None,
        eval_every_steps: int | None = None, log_every_steps: int = 10, limit_train_batches: int | None = None,
        checkpoint_every_epochs: int | None = None, output_dir: str | Path | None = None,
        tracker: str | list[str] | None = None, project: str = "bnguard", run_name: str | None = None,
        config: dict[str, Any] | None = None, metric: Metric = accuracy, metric_name: str = "acc", seed: int = 0,
        progress: bool = True, recalibration_loader: Iterable[Any] | None = None, forward: Forward | None = None,
        compute_loss: ComputeLoss | None = None,
    ):
        hooks = checked_hooks(hooks)
        self.schedule = Schedule.checked(has_eval_loader=eval_loader is not None, epochs=epochs, max_steps=max_steps,
                                         eval_every_epochs=eval_every_epochs, eval_every_steps=eval_every_steps,
                                         log_every_steps=log_every_steps, limit_train_batches=limit_train_batches)
        _check_not_empty(train_loader, eval_loader)
        self.accelerator = acc = _accelerator(accelerator, gradient_accumulation_steps)
        self.trackers = tracker_names(tracker if tracker is not None else [str(t) for t in acc.log_with])
        self.loss_fn, self.metric, self.metric_name, self.project = loss_fn, metric, metric_name, project
        self.run_name, self.show_progress = run_name, progress
        self.output_dir = shared_output_dir(acc, output_dir)
        self.records = RecordWriter(self.output_dir / "metrics.jsonl", is_main_process=acc.is_main_process)
        self.frozen_batchnorm = frozen_the_finetuning_way(model)
        self.model, self.optimizer, self.train_loader, self.eval_loader, self.scheduler = _prepare(
            acc, model, optimizer, train_loader, eval_loader, scheduler)
        self.checkpoints = Checkpoints(acc, self.model, self.output_dir / "checkpoints", checkpoint_every_epochs,
                                       records=lambda: self.records.records)  # a copy of them in each checkpoint
        self.forward = forward or default_forward
        self.train_step = TrainStep(acc, self.model, self.optimizer, self.scheduler,
                                    compute_loss or loss_of(self.forward, loss_fn), max_grad_norm)
        self.train_batches = hook_batches(train_loader, recalibration_loader, accelerator=acc, seed=seed)
        self.runner = HookRunner(hooks, accelerator=acc, model=self.model, optimizer=self.optimizer, forward=forward,
                                 evaluate=self.evaluate if self.eval_loader is not None else None,
                                 train_batches=self.train_batches, evaluation_hint="give bnguard.Loop an eval_loader")
        self.state = self.runner.state
        self.config = dict(config or {})
        acc.register_for_checkpointing(self.state, self.runner, *filter(None, [self.train_batches]))

    def fit(self, resume_from: str | Path | None = None, *, missing_ok: bool = False) -> dict[str, Any]:
        """Trains, firing events; returns the last epoch's record. ``resume_from``: a checkpoint folder or
        ``"latest"`` (the newest that verifies), continued exactly as if never interrupted; with ``missing_ok``
        no checkpoint at all means a fresh start (one command for the first start and every restart)."""
        state, acc = self.state, self.accelerator
        try:
            checkpoint = resolve_checkpoint(resume_from, self.output_dir, missing_ok) if resume_from else None
            epoch = _resumed(acc, checkpoint, state) if checkpoint is not None else 0
            record = self.records.open(epochs_done=epoch, copy=records_copy(checkpoint) if checkpoint else None)
            if self.schedule.finished(epoch, state.step):
                return self.records.finished(record)
            start_trackers(acc, self.trackers, project=self.project, output_dir=self.output_dir,
                           config={**_run_config(self), **self.config}, run_name=self.run_name,
                           resuming=checkpoint is not None)
            self.runner.fire(Event.FIT_START)
            while not self.schedule.finished(epoch, state.step) and not state.should_stop:
                record = self._run_epoch(epoch)
                epoch += 1
            self.checkpoints.at_end(epoch)
            self.runner.fire(Event.FIT_END)
            return record
        except BaseException as error:
            self.runner.fire_exception(error)
            raise
        finally:
            finish(acc)

    def evaluate(self) -> dict[str, float]:
        """Eval-mode loss and metric over the eval loader, each sample counted once across processes."""
        return evaluate_classifier(self.model, self.eval_loader, self.accelerator, self.loss_fn, self.metric,
                                   self.metric_name, self.forward)

    def _run_epoch(self, epoch: int) -> dict[str, Any]:
        started = time.perf_counter()
        if hasattr(self.train_loader, "set_epoch"):
            self.train_loader.set_epoch(epoch)
        self.runner.fire(Event.EPOCH_START, epoch=epoch, record={}, train_metrics={}, eval_metrics={})
        self.runner.fire(Event.TRAIN_EPOCH_END, train_metrics=self._train_epoch(epoch))
        if self.schedule.evaluates_after_epoch(epoch):
            self._evaluate_with_events()
        seconds = time.perf_counter() - started
        self.runner.fire(Event.EPOCH_END)
        record = self.records.write_epoch(self.state, seconds)
        self.checkpoints.after_epoch(epoch + 1)
        return record

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training batches, firing STEP_END (and step-scheduled evaluation) after every
        optimizer step; returns the epoch's train metrics."""
        state, acc, schedule = self.state, self.accelerator, self.schedule
        train_keeping_frozen(self.model, self.frozen_batchnorm)
        sums = MetricSums(acc.device)
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}", leave=False, dynamic_ncols=True,
                   disable=not show_progress(self.show_progress, acc.is_main_process))
        for index, batch in enumerate(bar):
            if not schedule.batch_allowed(index):
                break
            loss, outputs = self.train_step(batch)
            sums.add(loss, self.metric(logits_of(outputs).detach(), batch_targets(batch)), step=state.step + 1)
            if not acc.sync_gradients:
                continue
            self.runner.fire(Event.STEP_END, step=state.step + 1)
            logs, evaluates = schedule.logs_at(state.step), schedule.evaluates_at_step(state.step)
            running = _train_metrics(sums, self.metric_name, acc, epoch) if logs or evaluates else {}
            if logs:
                state.log({**running, "lr": self.optimizer.param_groups[0]["lr"], "epoch": epoch})
                bar.set_postfix({k.removeprefix("train_"): f"{v:.4f}" for k, v in running.items()})
            if evaluates:  # hooks compare with the epoch's train metrics so far
                self._evaluate_with_events(train_metrics=running)
            if state.should_stop or schedule.steps_done(state.step):
                break
        bar.close()
        return _train_metrics(sums, self.metric_name, acc, epoch)

    def _evaluate_with_events(self, **updates: Any) -> None:
        self.runner.fire(Event.EVAL_START, **updates)
        self.state.log(metrics := self.evaluate())
        self.runner.fire(Event.EVAL_END, eval_metrics=metrics)


def _prepare(acc: Accelerator, *objects: Any) -> list[Any]:
    """``acc.prepare`` on the objects that are not None; None stays None."""
    prepared = iter(acc.prepare(*(x for x in objects if x is not None)))
    return [next(prepared) if x is not None else None for x in objects]


def _accelerator(accelerator: Accelerator | None, gradient_accumulation_steps: int) -> Accelerator:
    positive_int("gradient_accumulation_steps", gradient_accumulation_steps)
    if accelerator is None:
        return Accelerator(gradient_accumulation_steps=gradient_accumulation_steps,
                           dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    if gradient_accumulation_steps not in (1, accelerator.gradient_accumulation_steps):
        raise ValueError(
            f"gradient_accumulation_steps={gradient_accumulation_steps} but the given accelerator accumulates "
            f"{accelerator.gradient_accumulation_steps}: set it on the Accelerator"
        )
    return accelerator


def _resumed(acc: Accelerator, checkpoint: Path, state: State) -> int:
    """Loads ``checkpoint`` into the run, says which one, and returns the epochs done."""
    acc.load_state(str(checkpoint))
    epochs = state.epoch + 1  # checkpoints are written once an epoch is over
    if acc.is_main_process:
        print(f"bnguard: resumed from {checkpoint} ({epochs} epoch(s) done, step {state.step})", flush=True)
    return epochs


def _run_config(loop: Loop) -> dict[str, Any]:
    """The loop's settings as the trackers' run config."""
    acc, schedule = loop.accelerator, loop.schedule
    return {"epochs": schedule.epochs, "max_steps": schedule.max_steps, "max_grad_norm": loop.train_step.max_grad_norm,
            "gradient_accumulation_steps": acc.gradient_accumulation_steps, "num_processes": acc.num_processes,
            "mixed_precision": acc.mixed_precision, "optimizer": type(loop.optimizer.optimizer).__name__,
            "lr": loop.optimizer.param_groups[0]["lr"], "hooks": [h.state_key for h in loop.runner.hooks]}


def _train_metrics(sums: MetricSums, metric_name: str, accelerator: Accelerator, epoch: int) -> dict[str, float]:
    """The train metrics so far, checked where logging already synchronizes: a NaN/Inf loss stops the run."""
    train_metrics = sums.compute("train", metric_name, accelerator.num_processes)
    if math.isfinite(train_metrics["train_loss"]):
        return train_metrics
    step = sums.first_nonfinite_step()
    where = f"from step {step}" if step is not None else "on another process"
    raise NonFiniteLossError(
        f"the training loss is not finite (NaN/Inf) {where}, in epoch {epoch + 1}: training stopped before "
        "that state was evaluated, recorded or checkpointed; the latest checkpoint is the last good one")


def _check_not_empty(train_loader: Iterable[Any], eval_loader: Iterable[Any] | None) -> None:
    if _length(train_loader) == 0:
        raise ValueError("train_loader is empty: it yields no batch to train on")
    if eval_loader is not None and _length(eval_loader) == 0:
        raise ValueError("eval_loader is empty: it yields no batch to evaluate; pass eval_loader=None to train "
                         "without evaluation")


def _length(loader: Iterable[Any]) -> float:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return math.inf
