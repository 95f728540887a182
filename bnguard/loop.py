"""An Accelerate training loop that fires :class:`~bnguard.Event` s to hooks."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, broadcast_object_list
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .checkpoint import Progress, resolve_checkpoint, save_checkpoint
from .data import side_batches
from .events import Event
from .hooks import Hook, Hooks
from .metrics import Metric, MetricSums, accuracy
from .tracking import start_trackers, tracker_names


class Loop:
    """Trains a classifier with Accelerate and fires events to hooks; the order is documented in
    :class:`bnguard.Event`. Batches are ``(inputs, targets)``; ``loss_fn(outputs, targets)`` returns the batch
    mean (default cross-entropy); ``metric(outputs, targets)`` returns per-sample scores (default accuracy),
    logged as ``train_<metric_name>`` / ``eval_<metric_name>``.

    Objects are prepared at construction (``loop.model`` is the prepared model). Without an ``accelerator``
    one is made from the Accelerate config with ``gradient_accumulation_steps`` and a seedable sampler, so
    that a resumed run draws the same batches. ``tracker`` is ``"wandb"``, ``"tensorboard"``, ``"all"`` or
    ``"none"``; W&B runs offline when no API key is configured. ``output_dir`` (default ``runs/<timestamp>``)
    receives ``metrics.jsonl``, tracker files and ``checkpoints/epoch-NNNN`` every
    ``checkpoint_every_epochs`` epochs and at the end. ``limit_train_batches`` caps the batches of each
    training epoch (quick runs).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        train_loader: DataLoader,
        *,
        eval_loader: DataLoader | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
        scheduler: Any = None,
        accelerator: Accelerator | None = None,
        hooks: Iterable[Hook] = (),
        epochs: int | None = None,
        max_steps: int | None = None,
        gradient_accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
        eval_every_epochs: int | None = None,
        eval_every_steps: int | None = None,
        log_every_steps: int = 10,
        limit_train_batches: int | None = None,
        checkpoint_every_epochs: int | None = None,
        output_dir: str | Path | None = None,
        tracker: str | list[str] | None = None,
        project: str = "bnguard",
        run_name: str | None = None,
        config: dict[str, Any] | None = None,
        metric: Metric = accuracy,
        metric_name: str = "acc",
        seed: int = 0,
        progress: bool = True,
    ):
        self.hooks = Hooks(hooks)
        _check_positive(epochs=epochs, max_steps=max_steps, gradient_accumulation_steps=gradient_accumulation_steps,
                        eval_every_epochs=eval_every_epochs, eval_every_steps=eval_every_steps,
                        log_every_steps=log_every_steps, checkpoint_every_epochs=checkpoint_every_epochs,
                        limit_train_batches=limit_train_batches)
        if epochs is None and max_steps is None:
            raise ValueError("give epochs or max_steps (or both): the loop needs to know when to stop")
        if _length(train_loader) == 0:
            raise ValueError("train_loader is empty: it yields no batch to train on")
        if eval_every_epochs and eval_every_steps:
            raise ValueError("give eval_every_epochs or eval_every_steps, not both")
        if (eval_every_epochs or eval_every_steps) and eval_loader is None:
            raise ValueError("evaluation was requested (eval_every_*) but no eval_loader was given")
        if eval_loader is not None and not eval_every_steps:
            eval_every_epochs = eval_every_epochs or 1
        if accelerator is None:
            accelerator = Accelerator(
                gradient_accumulation_steps=gradient_accumulation_steps,
                dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
            )
        elif gradient_accumulation_steps not in (1, accelerator.gradient_accumulation_steps):
            raise ValueError(
                f"gradient_accumulation_steps={gradient_accumulation_steps} but the given accelerator accumulates "
                f"{accelerator.gradient_accumulation_steps}: set it on the Accelerator"
            )
        self.accelerator = accelerator
        self.trackers = tracker_names(tracker if tracker is not None else [str(t) for t in accelerator.log_with])
        self.epochs, self.max_steps = epochs, max_steps
        self.max_grad_norm, self.log_every_steps = max_grad_norm, log_every_steps
        self.limit_train_batches = limit_train_batches
        self.eval_every_epochs, self.eval_every_steps = eval_every_epochs, eval_every_steps
        self.checkpoint_every_epochs = checkpoint_every_epochs
        self.loss_fn, self.metric, self.metric_name = loss_fn, metric, metric_name
        self.project, self.run_name, self.seed, self.show_progress = project, run_name, seed, progress
        self.config = dict(config or {})
        self.output_dir = self._agree_on_output_dir(output_dir)
        self.raw_train_loader = train_loader
        prepared = accelerator.prepare(model, optimizer, train_loader, *(x for x in (eval_loader, scheduler) if x is not None))
        self.model, self.optimizer, self.train_loader = prepared[:3]
        rest = list(prepared[3:])
        self.eval_loader = rest.pop(0) if eval_loader is not None else None
        self.scheduler = rest.pop(0) if scheduler is not None else None
        self.progress = Progress()
        accelerator.register_for_checkpointing(self.progress, self.hooks)
        self.state = self.hooks.state
        self.state.accelerator, self.state.model, self.state.optimizer = accelerator, self.model, self.optimizer
        self.state.evaluator = self.evaluate if self.eval_loader is not None else None
        self.state.batch_source = self._recalibration_batches

    def fit(self, resume_from: str | Path | None = None) -> dict[str, Any]:
        """Trains, firing events; returns the last epoch's record. ``resume_from``: a checkpoint folder or
        ``"latest"``; the run continues after the checkpoint's epoch exactly as if never interrupted."""
        state, acc = self.state, self.accelerator
        try:
            if resume_from is not None:
                acc.load_state(str(resolve_checkpoint(resume_from, self.output_dir)))
            self._open_metrics_file()
            start_trackers(acc, self.trackers, self.project, self.output_dir, self._run_config(), self.run_name)
            state.step, state.epoch = self.progress.step, self.progress.epoch
            self.hooks.fire(Event.FIT_START)
            record: dict[str, Any] = {}
            epoch = self.progress.epoch
            while not self._finished(epoch) and not state.should_stop:
                record = self._run_epoch(epoch)
                epoch += 1
            if self.checkpoint_every_epochs and epoch % self.checkpoint_every_epochs:
                save_checkpoint(acc, self.output_dir / "checkpoints", epoch)
            self.hooks.fire(Event.FIT_END)
            return record
        except BaseException as error:
            self.hooks.fire_exception(error)
            raise
        finally:
            for tracker in acc.trackers:
                tracker.finish()
            acc.trackers.clear()

    def evaluate(self) -> dict[str, float]:
        """Eval-mode loss and metric over the eval loader, each sample counted once across processes."""
        model, acc = self.model, self.accelerator
        was_training = model.training
        model.eval()
        sums = MetricSums(acc.device)
        try:
            with torch.no_grad():
                for inputs, targets in self.eval_loader:
                    outputs, targets = acc.gather_for_metrics((model(inputs), targets))
                    sums.add(self.loss_fn(outputs, targets), self.metric(outputs, targets))
        finally:
            model.train(was_training)
        return sums.compute("eval", self.metric_name)

    def _run_epoch(self, epoch: int) -> dict[str, Any]:
        state, acc, model = self.state, self.accelerator, self.model
        started = time.perf_counter()
        state.record, state.train_metrics, state.eval_metrics = {}, {}, {}
        if hasattr(self.train_loader, "set_epoch"):
            self.train_loader.set_epoch(epoch)
        self.hooks.fire(Event.EPOCH_START, epoch=epoch)
        model.train()
        sums = MetricSums(acc.device)
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}", leave=False, dynamic_ncols=True,
                   disable=not (self.show_progress and acc.is_main_process and sys.stderr.isatty()))
        for index, (inputs, targets) in enumerate(bar):
            if self.limit_train_batches is not None and index == self.limit_train_batches:
                break
            with acc.accumulate(model):
                outputs = model(inputs)
                loss = self.loss_fn(outputs, targets)
                acc.backward(loss)
                if acc.sync_gradients and self.max_grad_norm is not None:
                    acc.clip_grad_norm_(model.parameters(), self.max_grad_norm)
                self.optimizer.step()
                if self.scheduler is not None:
                    self.scheduler.step()
                self.optimizer.zero_grad()
            sums.add(loss, self.metric(outputs.detach(), targets))
            if not acc.sync_gradients:
                continue
            self.progress.step = state.step = state.step + 1
            self.hooks.fire(Event.STEP_END)
            if state.step % self.log_every_steps == 0:
                running = sums.compute("train", self.metric_name, acc)
                state.log({**running, "lr": self.optimizer.param_groups[0]["lr"], "epoch": epoch})
                bar.set_postfix({k.removeprefix("train_"): f"{v:.4f}" for k, v in running.items()})
            if self.eval_every_steps and state.step % self.eval_every_steps == 0:
                self._evaluate_with_events()
                model.train()
            if state.should_stop or self._steps_done():
                break
        bar.close()
        state.train_metrics = sums.compute("train", self.metric_name, acc)
        self.hooks.fire(Event.TRAIN_EPOCH_END)
        if self.eval_every_epochs and (epoch + 1) % self.eval_every_epochs == 0:
            self._evaluate_with_events()
        seconds = time.perf_counter() - started
        self.hooks.fire(Event.EPOCH_END)
        record = {"epoch": epoch + 1, "step": state.step, **state.train_metrics, **state.eval_metrics,
                  "seconds": seconds, **state.record}
        self.progress.epoch = epoch + 1
        self._write_record(record)
        if self.checkpoint_every_epochs and (epoch + 1) % self.checkpoint_every_epochs == 0:
            save_checkpoint(acc, self.output_dir / "checkpoints", epoch + 1)
        return record

    def _evaluate_with_events(self) -> None:
        self.hooks.fire(Event.EVAL_START)
        self.state.eval_metrics = self.evaluate()
        self.state.log(self.state.eval_metrics)
        self.hooks.fire(Event.EVAL_END)

    def _recalibration_batches(self) -> Iterable[Any]:
        self.progress.draws += 1
        acc = self.accelerator
        return side_batches(self.raw_train_loader, seed=self.seed * 1_000_003 + self.progress.draws,
                            rank=acc.process_index, world_size=acc.num_processes)

    def _finished(self, epoch: int) -> bool:
        return (self.epochs is not None and epoch >= self.epochs) or self._steps_done()

    def _steps_done(self) -> bool:
        return self.max_steps is not None and self.state.step >= self.max_steps

    def _agree_on_output_dir(self, output_dir: str | Path | None) -> Path:
        if output_dir is None:  # one timestamp for every process
            chosen = [f"runs/{time.strftime('%Y%m%d-%H%M%S')}"]
            if self.accelerator.num_processes > 1:
                broadcast_object_list(chosen)
            output_dir = chosen[0]
        return Path(output_dir)

    def _run_config(self) -> dict[str, Any]:
        acc = self.accelerator
        settings = {
            "epochs": self.epochs, "max_steps": self.max_steps, "max_grad_norm": self.max_grad_norm,
            "gradient_accumulation_steps": acc.gradient_accumulation_steps, "num_processes": acc.num_processes,
            "mixed_precision": acc.mixed_precision, "optimizer": type(self.optimizer.optimizer).__name__,
            "lr": self.optimizer.param_groups[0]["lr"], "hooks": [h.state_key for h in self.hooks.hooks],
        }
        return {**settings, **self.config}

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"

    def _open_metrics_file(self) -> None:
        """Keeps the records of epochs already done (all of them on resume), atomically."""
        if not self.accelerator.is_main_process:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.metrics_path.exists():
            lines = self.metrics_path.read_text().splitlines()
            kept = [line for line in lines if line.strip() and json.loads(line)["epoch"] <= self.progress.epoch]
        partial = self.metrics_path.with_suffix(".jsonl.partial")
        partial.write_text("".join(line + "\n" for line in kept))
        partial.replace(self.metrics_path)

    def _write_record(self, record: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        with self.metrics_path.open("a") as out:
            out.write(json.dumps(record) + "\n")
        if not (self.show_progress and sys.stderr.isatty()):
            shown = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                             for k, v in record.items() if isinstance(v, (int, float, str)))
            print(shown, flush=True)


def _check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value}")


def _length(loader: Iterable[Any]) -> float:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return math.inf
