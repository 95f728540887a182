"""Every call bnguard's hooks make to W&B, TensorBoard, MLflow and Aim: :class:`Trackers`, through which hooks
log scalars and what scalar loggers cannot carry (histograms, images, tables, tags, alerts). Starting the
trackers is the drivers' part (``drivers/tracker_setup.py``)."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from ..utils.distributed import process_info
from . import mlflow_aim


class Histogram(NamedTuple):
    """Bin counts and edges over a tensor's finite values, with the exact totals TensorBoard shows and the
    extremes (NaN without a finite value; the edges of a constant tensor's histogram lie around it)."""

    counts: np.ndarray
    edges: np.ndarray
    num: int
    sum: float
    sum_squares: float
    minimum: float = math.nan
    maximum: float = math.nan


OWN_SECTIONS = ("bnguard/", "bn/", "at-a-glance/")  # the key prefixes of bnguard's own series


class Trackers:
    """Where a run's values go: scalars, histograms, tables and alerts, to the W&B run and TensorBoard writer
    the run already has. This one sends them to an Accelerate accelerator's trackers (without one, to the
    active ``wandb.run``, if any); the framework integrations subclass it to reach their trainer's loggers.
    Only the main process logs.

    Args:
        accelerator: whose trackers to log to.
        metrics_under: a prefix for the train and eval metrics hooks log (``train_loss``, ``eval_acc``, ...),
            for a run whose script logs those names itself (:class:`~bnguard.Guard` uses ``"bnguard/"``); keys
            already in bnguard's sections (:data:`OWN_SECTIONS`) keep their names.
    """

    def __init__(self, accelerator: Any = None, *, metrics_under: str = ""):
        self.accelerator, self.metrics_under = accelerator, metrics_under

    def named(self, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` under the names this run logs them by (see ``metrics_under``)."""
        if not self.metrics_under:
            return values
        return {key if key.startswith(OWN_SECTIONS) else self.metrics_under + key: value
                for key, value in values.items()}

    @property
    def is_main_process(self) -> bool:
        """The accelerator's main process; without one, rank 0 of the default process group (if any)."""
        if self.accelerator is None:
            return process_info()[0] == 0
        return self.accelerator.is_main_process

    def log(self, values: dict[str, Any], step: int) -> None:
        """Scalars to every tracker, at ``step``."""
        values = self.named(values)
        if self.accelerator is not None:
            self.accelerator.log(values, step=step)
        elif (run := self.wandb_run()) is not None:
            run.log(values, step=step)

    def wandb_run(self) -> Any:
        """The W&B run on this process, or None."""
        if self.accelerator is None:
            wandb = sys.modules.get("wandb")  # a run can only be active if wandb was imported
            return getattr(wandb, "run", None) if wandb is not None else None
        return _unwrapped(self.accelerator, "wandb")

    def wandb_log(self, values: dict[str, Any], step: int) -> None:
        """Any W&B values (histograms, tables) at ``step``, the way this run's W&B steps are counted."""
        self.wandb_run().log(values, step=step)

    def tensorboard_writer(self) -> Any:
        """The TensorBoard ``SummaryWriter`` on this process, or None."""
        return _unwrapped(self.accelerator, "tensorboard") if self.accelerator is not None else None

    def mlflow_run_id(self) -> str | None:
        """The id of the MLflow run on this process, or None."""
        run = _unwrapped(self.accelerator, "mlflow") if self.accelerator is not None else None
        return run.info.run_id if run is not None else None

    def aim_run(self) -> Any:
        """The Aim ``Run`` on this process, or None."""
        return _unwrapped(self.accelerator, "aim") if self.accelerator is not None else None

    def draws_images(self) -> bool:
        return any(tracker() is not None for tracker in (self.wandb_run, self.tensorboard_writer, self.aim_run,
                                                         self.mlflow_run_id))

    def log_histograms(self, histograms: dict[str, Histogram], values: dict[str, Any], step: int) -> None:
        """Histograms and plain values at ``step``: histograms to W&B as ``wandb.Histogram``, to TensorBoard
        through ``add_histogram_raw`` (loggers built for scalars would drop or refuse them), to Aim as
        distributions and to MLflow as their summaries (``<key>/mean``, ``/std``, ``/min``, ``/max``); values
        to every tracker."""
        if not self.is_main_process:
            return
        if values:
            self.log(values, step)
        if histograms and self.wandb_run() is not None:
            import wandb

            self.wandb_log({k: wandb.Histogram(np_histogram=(h.counts, h.edges)) for k, h in histograms.items()}, step)
        if (writer := self.tensorboard_writer()) is not None:
            _tensorboard_histograms(writer, histograms, step)
        if histograms and (run_id := self.mlflow_run_id()) is not None:
            mlflow_aim.mlflow_metrics(run_id, mlflow_aim.summaries(histograms), step)
        if histograms and (run := self.aim_run()) is not None:
            mlflow_aim.aim_distributions(run, histograms, step)

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        """A table at ``step``: to W&B, to MLflow as ``<key>.csv`` (the latest), to Aim as a run parameter (a
        list of rows as dicts); TensorBoard has no tables."""
        if not self.is_main_process:
            return
        if self.wandb_run() is not None:
            import wandb

            self.wandb_log({key: wandb.Table(columns=list(columns), data=[list(row) for row in rows])}, step)
        if (run_id := self.mlflow_run_id()) is not None:
            mlflow_aim.mlflow_files(run_id, {f"{key}.csv": mlflow_aim.csv_bytes(columns, rows)})
        if (run := self.aim_run()) is not None:
            mlflow_aim.aim_params(run, {key: [dict(zip(columns, row)) for row in rows]})

    def log_tags(self, tags: dict[str, str]) -> None:
        """Words that name a run's latest state (a verdict, a reason): MLflow tags and Aim run parameters,
        the later value replacing the earlier (the history stays in the records and the metrics)."""
        if not self.is_main_process:
            return
        if (run_id := self.mlflow_run_id()) is not None:
            mlflow_aim.mlflow_tags(run_id, tags)
        if (run := self.aim_run()) is not None:
            mlflow_aim.aim_params(run, tags)

    def keep_files(self, files: dict[str, bytes]) -> None:
        """The run's latest pictures and tables as files (``{path: content}``), each replacing the one before:
        MLflow artifacts. Check :meth:`mlflow_run_id` first to skip drawing them for nothing."""
        if self.is_main_process and (run_id := self.mlflow_run_id()) is not None:
            mlflow_aim.mlflow_files(run_id, files)

    def log_chart(self, key: str, chart: Any, step: int) -> None:
        """A W&B custom chart (``wandb.plot.*``) at ``step``; TensorBoard has no such charts."""
        if self.is_main_process and self.wandb_run() is not None:
            self.wandb_log({key: chart}, step)

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        """An RGB image (height x width x 3, uint8) at ``step``, to W&B, TensorBoard, MLflow and Aim."""
        if not self.is_main_process:
            return
        if self.wandb_run() is not None:
            import wandb

            self.wandb_log({key: wandb.Image(image)}, step)
        writer = self.tensorboard_writer()
        if writer is not None:
            writer.add_image(key, image, global_step=step, dataformats="HWC")
        if (run_id := self.mlflow_run_id()) is not None:
            mlflow_aim.mlflow_image(run_id, key, image, step)
        if (run := self.aim_run()) is not None:
            mlflow_aim.aim_image(run, key, image, step)

    def alert(self, title: str, text: str) -> bool:
        """A W&B alert (e-mail / Slack) when the run is online; returns whether one was sent."""
        run = self.wandb_run() if self.is_main_process else None
        if run is None or run.settings.mode != "online":
            return False
        import wandb

        run.alert(title=title, text=text, level=wandb.AlertLevel.WARN)
        return True


def _tensorboard_histograms(writer: Any, histograms: dict[str, Histogram], step: int) -> None:
    for key, h in histograms.items():
        writer.add_histogram_raw(key, min=float(h.edges[0]), max=float(h.edges[-1]), num=h.num, sum=h.sum,
                                 sum_squares=h.sum_squares, bucket_limits=h.edges[1:].tolist(),
                                 bucket_counts=h.counts.tolist(), global_step=step)


def _unwrapped(accelerator: Any, name: str) -> Any:
    """The named tracker's own object (W&B run, SummaryWriter), or None where this process has none."""
    if not accelerator.trackers:  # get_tracker would hand back a blank stand-in
        return None
    try:
        return accelerator.get_tracker(name, unwrap=True)
    except ValueError:  # other trackers, not this one
        return None
