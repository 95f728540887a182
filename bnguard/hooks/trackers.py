"""Every call bnguard's hooks make to W&B and TensorBoard: :class:`Trackers`, through which hooks log scalars
and what scalar loggers cannot carry (histograms, tables, alerts). Starting the trackers is the drivers' part
(``drivers/tracker_setup.py``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from ..utils.distributed import process_info


class Histogram(NamedTuple):
    """Bin counts and edges over a tensor's finite values, with the exact totals TensorBoard shows."""

    counts: np.ndarray
    edges: np.ndarray
    num: int
    sum: float
    sum_squares: float


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

    def log_histograms(self, histograms: dict[str, Histogram], values: dict[str, Any], step: int) -> None:
        """Histograms and plain values at ``step``: histograms to W&B as ``wandb.Histogram`` and to TensorBoard
        through ``add_histogram_raw`` (loggers built for scalars would drop or refuse them), values to every
        tracker."""
        if not self.is_main_process:
            return
        if values:
            self.log(values, step)
        if histograms and self.wandb_run() is not None:
            import wandb

            self.wandb_log({k: wandb.Histogram(np_histogram=(h.counts, h.edges)) for k, h in histograms.items()}, step)
        writer = self.tensorboard_writer()
        if writer is not None:
            for key, h in histograms.items():
                writer.add_histogram_raw(key, min=float(h.edges[0]), max=float(h.edges[-1]), num=h.num, sum=h.sum,
                                         sum_squares=h.sum_squares, bucket_limits=h.edges[1:].tolist(),
                                         bucket_counts=h.counts.tolist(), global_step=step)

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        """A table at ``step``, to W&B only (TensorBoard has no tables)."""
        if self.is_main_process and self.wandb_run() is not None:
            import wandb

            self.wandb_log({key: wandb.Table(columns=list(columns), data=[list(row) for row in rows])}, step)

    def log_chart(self, key: str, chart: Any, step: int) -> None:
        """A W&B custom chart (``wandb.plot.*``) at ``step``; TensorBoard has no such charts."""
        if self.is_main_process and self.wandb_run() is not None:
            self.wandb_log({key: chart}, step)

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        """An RGB image (height x width x 3, uint8) at ``step``, to W&B and TensorBoard."""
        if not self.is_main_process:
            return
        if self.wandb_run() is not None:
            import wandb

            self.wandb_log({key: wandb.Image(image)}, step)
        writer = self.tensorboard_writer()
        if writer is not None:
            writer.add_image(key, image, global_step=step, dataformats="HWC")

    def alert(self, title: str, text: str) -> bool:
        """A W&B alert (e-mail / Slack) when the run is online; returns whether one was sent."""
        run = self.wandb_run() if self.is_main_process else None
        if run is None or run.settings.mode != "online":
            return False
        import wandb

        run.alert(title=title, text=text, level=wandb.AlertLevel.WARN)
        return True


def _unwrapped(accelerator: Any, name: str) -> Any:
    """The named tracker's own object (W&B run, SummaryWriter), or None where this process has none."""
    if not accelerator.trackers:  # get_tracker would hand back a blank stand-in
        return None
    try:
        return accelerator.get_tracker(name, unwrap=True)
    except ValueError:  # other trackers, not this one
        return None
