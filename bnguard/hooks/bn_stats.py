"""Per-layer histograms of BatchNorm running statistics, for W&B, TensorBoard, MLflow and Aim."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..recalibration.isolation import batchnorm_in_train_mode
from ..recalibration.layers import batchnorm_layers, is_uninitialized, model_device, side_by_side, tracks_statistics
from ..utils.console import WarnOnce
from ..utils.validation import positive_int
from .base import Hook
from .overview import NEVER, SECTION, Overview, Snapshots, due
from .state import State
from .trackers import Histogram, Trackers

MAX_BINS = 512  # W&B's limit


def check_bins(bins: int) -> int:
    if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= MAX_BINS:
        raise ValueError(f"bins must be an integer from 1 to {MAX_BINS} (W&B's limit), got {bins!r}")
    return bins


def bn_statistics(model: nn.Module, bins: int = 64, include_affine: bool = False) -> dict[str, Any]:
    """Histograms over channels and summary scalars of every tracking, initialized BatchNorm layer.

    Returns ``{"bn/<layer>/<tensor>": (counts, edges)}`` (NumPy arrays; non-finite channels left out) and the
    scalars ``bn/<layer>/running_mean_mean``, ``running_mean_std``, ``log_running_var_mean`` and ``nonfinite``
    (channels whose running mean or variance is NaN/Inf). Computed where the tensors live, every layer's
    channels side by side (a few dozen tensor operations whatever the number of layers, the bins as
    ``torch.histc`` draws them); only ranges, counts and scalars leave the device, in two transfers in all.
    """
    check_bins(bins)
    layers = [(n, m) for n, m in batchnorm_layers(model) if tracks_statistics(m) and not is_uninitialized(m)]
    if not layers:
        return {}
    device = layers[0][1].running_mean.device
    widths = [layer.running_mean.numel() for _, layer in layers]
    means = side_by_side([layer.running_mean for _, layer in layers], device)
    variances = side_by_side([layer.running_var for _, layer in layers], device)
    finite = torch.isfinite(means) & torch.isfinite(variances)
    keys, parts, masks = [], [], []
    split = zip(means.split(widths), variances.split(widths), finite.split(widths))
    for (name, layer), (mean, var, kept) in zip(layers, split):
        for key, values in (("running_mean", mean), ("running_var", var)):
            keys.append(f"bn/{name}/{key}")
            parts.append(values)
            masks.append(kept)
        if include_affine and layer.affine:
            for key in ("weight", "bias"):
                values = getattr(layer, key).detach().to(device, torch.float64)
                keys.append(f"bn/{name}/{key}")
                parts.append(values)
                masks.append(torch.isfinite(values))
    values, mask = torch.cat(parts), torch.cat(masks)
    entry = torch.repeat_interleave(torch.arange(len(parts), device=device),
                                    torch.tensor([len(p) for p in parts], device=device))
    layer_of = torch.repeat_interleave(torch.arange(len(layers), device=device), torch.tensor(widths, device=device))
    figures = torch.cat([_totals(values, mask, entry, len(parts)).flatten(),
                         _summaries(means, variances, finite, layer_of, len(layers)).flatten()]).tolist()
    totals = [figures[5 * i: 5 * i + 5] for i in range(len(parts))]
    ranges = [_widened(low, high) for low, high, *_ in totals]
    counts = _bin_counts(values, mask, entry, ranges, bins).cpu()
    out: dict[str, Any] = {}
    for key, (low, high), row, (least, most, num, total, squares) in zip(keys, ranges, counts, totals):
        extremes = (least, most) if num else (math.nan, math.nan)
        out[key] = Histogram(row.numpy(), np.linspace(low, high, bins + 1), int(num), total, squares, *extremes)
    summaries = figures[5 * len(parts):]
    for i, (name, _) in enumerate(layers):
        centre, spread, log_var, nonfinite = summaries[4 * i: 4 * i + 4]
        out[f"bn/{name}/running_mean_mean"], out[f"bn/{name}/running_mean_std"] = centre, spread
        out[f"bn/{name}/log_running_var_mean"], out[f"bn/{name}/nonfinite"] = log_var, int(nonfinite)
    return out


def _totals(values: torch.Tensor, mask: torch.Tensor, entry: torch.Tensor, entries: int) -> torch.Tensor:
    """Per entry: min, max, count, sum and sum of squares of its finite values (min > max when none)."""
    kept = torch.where(mask, values, 0.0)
    low = values.new_full((entries,), torch.inf).scatter_reduce_(0, entry, torch.where(mask, values, torch.inf), "amin")
    high = values.new_full((entries,), -torch.inf).scatter_reduce_(0, entry, torch.where(mask, values, -torch.inf),
                                                                   "amax")
    sums = values.new_zeros(3, entries).index_add_(1, entry, torch.stack([mask.double(), kept, kept.square()]))
    return torch.stack([low, high, *sums], dim=1)


def _summaries(means: torch.Tensor, variances: torch.Tensor, finite: torch.Tensor, layer_of: torch.Tensor,
               layers: int) -> torch.Tensor:
    """Per layer: channel mean and std of the running mean, mean log running variance, non-finite channels."""
    def per_layer(x: torch.Tensor) -> torch.Tensor:
        return means.new_zeros(layers).index_add_(0, layer_of, torch.where(finite, x, 0.0))

    kept = per_layer(torch.ones_like(means)).clamp(min=1)
    centre = per_layer(means) / kept
    spread = (per_layer((means - centre[layer_of]).square()) / (kept - 1).clamp(min=1)).sqrt()
    log_var = per_layer(variances.clamp(min=torch.finfo(torch.float64).tiny).log()) / kept
    nonfinite = means.new_zeros(layers).index_add_(0, layer_of, (~finite).double())
    return torch.stack([centre, spread, log_var, nonfinite], dim=1)


def _bin_counts(values: torch.Tensor, mask: torch.Tensor, entry: torch.Tensor, ranges: list[tuple[float, float]],
                bins: int) -> torch.Tensor:
    """Every entry's histogram of its finite values over its range, binned as ``torch.histc`` bins (the top
    edge in the last bin), counted in one scatter with no data-dependent shape (so no synchronization)."""
    low, high = torch.tensor(ranges, dtype=torch.float64, device=values.device).unbind(1)
    position = ((values - low[entry]) * bins / (high[entry] - low[entry])).floor().clamp(0, bins - 1)
    slot = torch.where(mask, entry * bins + position.long(), len(ranges) * bins)  # the left-out, in a last slot
    counts = torch.zeros(len(ranges) * bins + 1, dtype=torch.long, device=values.device)
    return counts.scatter_add_(0, slot, torch.ones_like(slot))[:-1].reshape(len(ranges), bins)


def _widened(low: float, high: float) -> tuple[float, float]:
    if low > high:  # no finite value at all: an empty histogram on a unit range
        return 0.0, 1.0
    if low == high:  # a constant tensor still gets a valid histogram, centred on its value
        return low - 0.5, high + 0.5
    return low, high


def log_bn_stats(
    model: nn.Module, step: int, *, accelerator: Any = None, bins: int = 64, include_affine: bool = False,
    trackers: Trackers | None = None,
) -> dict[str, Any]:
    """One logging round of :func:`bn_statistics`, at ``step``, on the main process; returns what it logged.

    With an ``accelerator``, values go to its trackers: histograms to W&B as ``wandb.Histogram`` and to
    TensorBoard through ``add_histogram_raw`` (Accelerate's TensorBoard tracker would drop them), scalars to
    every tracker. Without one, to the active ``wandb.run``, if any. ``trackers`` (a :class:`Trackers`)
    sends them elsewhere, e.g. to a Lightning or Hugging Face trainer's loggers.
    """
    trackers = trackers or Trackers(accelerator)
    if not trackers.is_main_process:
        return {}
    stats = bn_statistics(model, bins, include_affine)
    if stats:
        histograms = {k: v for k, v in stats.items() if isinstance(v, Histogram)}
        trackers.log_histograms(histograms, {k: v for k, v in stats.items() if k not in histograms}, step)
    return stats


class BNStatsLogger(Hook):
    """Logs histograms of every BatchNorm layer's ``running_mean`` / ``running_var`` under
    ``bn/<layer>/...`` (see :func:`bn_statistics`), at the loop's global step. Main process only, with no
    collective; steps that do not log cost one integer comparison.

    It prints a torchinfo summary and logs a W&B table of the BatchNorm layers with their output shapes: at
    fit start from ``input_size`` if given, else at the first step from the inputs of the first training
    forward (kept by a one-shot pre-hook: no batch is drawn and no random number used, so the run is the
    same with or without it). On every RECALIBRATED event it logs how far each layer's statistics moved,
    ``bn/<layer>/staleness_mean_shift_max`` (in new-std units) and ``bn/<layer>/staleness_log_var_ratio_max``,
    and the new statistics.

    The overview, under ``at-a-glance/``: a chart of ``train_<metric>``, ``eval_<metric>`` and the eval value
    with the running statistics as trained, per epoch; one chart per summary statistic with a line per layer,
    after each evaluation; and at each recalibration a layers x recalibrations heatmap of how far each one
    moved each layer (an image in every tracker; :meth:`save_staleness` writes it as a PNG). In a long
    run the accuracy chart is logged at each of the first 64 epochs, then every 64th; the layer charts and the
    heatmap at the powers of two (W&B keeps every chart table it is given in memory); all of them at the end.
    The history is thinned evenly to at most 512 points (128 per layer line as logged), the heatmap to the
    latest 64 recalibrations: the W&B files grow linearly with the run, memory stays flat, and a late
    evaluation costs what an early one did.

    Args:
        every_n_steps: log the histograms every this many steps.
        on_eval: log them after each evaluation too.
        bins: histogram bins.
        include_affine: also each layer's weight and bias.
        input_size: the model's input size for the layer table at fit start (default: the first batch's).
        overview: log the at-a-glance overview.
        overview_metric: the metric its accuracy chart shows (default ``acc``).
    """

    def __init__(self, every_n_steps: int = 100, on_eval: bool = True, bins: int = 64,
                 include_affine: bool = False, input_size: tuple[int, ...] | None = None, overview: bool = True,
                 overview_metric: str = "acc"):
        self.every_n_steps, self.on_eval = positive_int("every_n_steps", every_n_steps), on_eval
        self.bins = check_bins(bins)
        self.include_affine, self.input_size = include_affine, input_size
        self.overview = Overview(overview_metric) if overview else None
        self._snapshots = Snapshots()
        self._logged_step: int | None = None
        self._capture: Any = None
        self._first_input: tuple[tuple, dict] | None = None
        self._warn_once = WarnOnce()

    def on_fit_start(self, state: State) -> None:
        if not state.is_main_process:
            return
        if not any(True for _ in batchnorm_layers(state.model)):
            warnings.warn("BNStatsLogger: the model has no BatchNorm layer, nothing will be logged", stacklevel=2)
        elif self.input_size is not None:
            describe_layers(state, {"input_size": self.input_size})
        else:
            self._capture = state.unwrapped_model.register_forward_pre_hook(self._keep_first_input,
                                                                            with_kwargs=True)

    def on_step_end(self, state: State) -> None:
        if self._first_input is not None:
            args, kwargs = self._first_input
            self._first_input = None
            describe_layers(state, {"input_data": list(args), **kwargs} if args else {"input_data": kwargs})
        if state.step % self.every_n_steps == 0:
            self._log(state)

    def on_eval_end(self, state: State) -> None:
        logged = self._log(state) if self.on_eval else None
        self._publish(state, layers=self.overview is not None and due(self.overview.layer_rounds.rounds, NEVER),
                      files=True, stats=logged)

    def on_epoch_end(self, state: State) -> None:
        if self.overview is None or not state.is_main_process:
            return
        if self.overview.add_epoch(state.epoch + 1, state.train_metrics, state.eval_metrics, state.record):
            self._publish(state, accuracy=due(self.overview.epoch_rounds.rounds, 64, first=64))
        elif state.eval_metrics:
            metric = self.overview.metric
            self._warn_once("no metric", f"BNStatsLogger(overview_metric={metric!r}): the evaluation gives no "
                            f"eval_{metric} (it gives {sorted(state.eval_metrics)}), so the at-a-glance accuracy chart "
                            "stays empty: pass overview_metric= the name of one of those, without 'eval_'")

    def on_recalibrated(self, state: State) -> None:
        values = {}
        for layer in state.recalibration.recalibrated:
            values[f"bn/{layer.name}/staleness_mean_shift_max"] = layer.mean_shift_max
            values[f"bn/{layer.name}/staleness_log_var_ratio_max"] = layer.var_log_ratio_max
        state.log(values)
        self._logged_step = None  # the statistics changed: log them again even at this step
        self._log(state)
        if self.overview is not None and state.is_main_process:
            self.overview.add_recalibration(state.step, state.recalibration)
            self._publish(state, staleness=due(self.overview.recalibration_count, NEVER))

    def on_fit_end(self, state: State) -> None:
        self._stop_capturing()
        self._publish(state, accuracy=True, layers=True, staleness=True)

    def state_dict(self) -> dict[str, Any]:
        return {"overview": self.overview.state_dict()} if self.overview is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.overview is not None and "overview" in state:
            self.overview.load_state_dict(state["overview"])

    def save_staleness(self, path: str | Path) -> Path | None:
        """Writes the layers x recalibrations heatmap as a PNG; None without overview or recalibration."""
        return self.overview.save_staleness(path) if self.overview is not None else None

    def on_exception(self, state: State) -> None:
        self._stop_capturing()

    def _log(self, state: State) -> dict[str, Any] | None:
        """Logs the statistics and returns them; None where this step's were logged already (once a step)."""
        if self._logged_step == state.step:
            return None
        self._logged_step = state.step
        stats = log_bn_stats(state.model, state.step, bins=self.bins, include_affine=self.include_affine,
                             trackers=state.trackers)
        if self.overview is not None and stats:
            self.overview.add_layer_statistics(state.step, stats)
        return stats

    def _publish(self, state: State, *, accuracy: bool = False, layers: bool = False, staleness: bool = False,
                 files: bool = False, stats: dict[str, Any] | None = None) -> None:
        """The overview: charts to W&B, the heatmap to every tracker that shows images, the files to MLflow
        (main process only), from ``stats`` where the statistics were just computed."""
        trackers, overview = state.trackers, self.overview
        if overview is None or not trackers.is_main_process:
            return
        if trackers.wandb_run() is not None:
            charts = {overview.metric: overview.accuracy_chart()} if accuracy and overview.epochs else {}
            charts.update(overview.layer_charts() if layers else {})
            for name, chart in charts.items():
                trackers.log_chart(f"{SECTION}/{name}", chart, state.step)
        if files and trackers.mlflow_run_id() is not None:  # MLflow's latest picture, at every evaluation
            stats = stats if stats is not None else bn_statistics(state.model, self.bins)
            trackers.keep_files(self._snapshots.files(stats, overview))
        if staleness and trackers.draws_images() and (image := overview.staleness_image()) is not None:
            trackers.log_image(f"{SECTION}/staleness", image, state.step)

    def _keep_first_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if "forward" in vars(module):  # a wrapper runs another method as forward (Lightning's DDP runs
            return                     # training_step so): wait for the model's own forward, called inside
        self._first_input = (tuple(_detached(a) for a in args), {k: _detached(v) for k, v in kwargs.items()})
        self._stop_capturing()

    def _stop_capturing(self) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None


def describe_layers(state: State, inputs: dict[str, Any]) -> None:
    """Prints the torchinfo summary and logs the layer table with each BatchNorm layer's output shape."""
    from torchinfo import summary

    model = state.unwrapped_model
    device = model_device(model)
    names, shapes = {id(module): name for name, module in batchnorm_layers(model)}, {}
    try:
        with torch.no_grad(), batchnorm_in_train_mode(model, ()):  # modes, buffers, random states kept
            stats = summary(model, device=device, verbose=0, **inputs)
    except Exception as error:  # noqa: BLE001 - a summary is a nicety: never stop training for it
        warnings.warn(f"BNStatsLogger: torchinfo could not summarize the model ({error!r:.200}); the layer "
                      "table is logged without output shapes", stacklevel=2)
    else:
        print(stats)
        shapes = {names[id(row.module)]: row.output_size for row in stats.summary_list if id(row.module) in names}
    columns = ["layer", "num_features", "momentum", "eps", "affine", "track_running_stats", "output_shape"]
    rows = [[name, layer.num_features, str(layer.momentum), layer.eps, layer.affine, layer.track_running_stats,
             str(shapes.get(name, "unknown"))] for name, layer in batchnorm_layers(model)]
    state.trackers.log_table("bn/layers", columns, rows, state.step)


def _detached(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value
