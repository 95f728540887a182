"""The charts a run is read by at a glance: accuracy with and without recalibration, every BatchNorm layer in
one chart per statistic, and a layers x recalibrations heatmap of how far each recalibration moved each layer."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ..recalibration.report import RecalibrationReport
from .mlflow_aim import SUMMARIES, csv_bytes, summaries
from .record_keys import RecordKeys
from .trackers import Histogram

SECTION = "at-a-glance"  # sorts before bn/ and bnguard/, so that W&B shows it first
LAYER_STATISTICS = ("running_mean_mean", "running_mean_std", "log_running_var_mean")
MAX_POINTS = 256  # per chart line: a longer history is thinned evenly, so redrawing costs the same late in a run
MAX_COLUMNS = 64  # recalibrations in the heatmap: the latest
CHART_POINTS = 128  # per line of a layer chart as logged
NEVER = 0  # as ``every``: only the powers of two


def due(count: int, every: int, first: int = 0) -> bool:
    """Whether the ``count``-th update of a chart is logged: each of the ``first``, then the powers of two and
    every ``every``-th, so that a long run's W&B files grow linearly with the run (each chart's size is
    bounded, and so is how often it is logged)."""
    return count <= first or count & (count - 1) == 0 or (every != NEVER and count % every == 0)


class Thinned:
    """Which rounds of a growing history are kept: every ``stride``-th, the stride doubling (and every other
    kept round dropped) once ``2 * MAX_POINTS`` are kept, so that a run of any length keeps evenly spaced
    rounds, at most that many."""

    def __init__(self, state: dict[str, int] | None = None):
        self.stride, self.rounds = (state["stride"], state["rounds"]) if state else (1, 0)

    def next_kept(self) -> bool:
        """Counts a new round; whether it is kept."""
        self.rounds += 1
        return (self.rounds - 1) % self.stride == 0

    def thin(self, *series: list[Any]) -> None:
        """Drops every other kept round from each of ``series`` when they hold too many."""
        if series and len(series[0]) > 2 * MAX_POINTS:
            for values in series:
                values[:] = values[::2]
            self.stride *= 2

    def state_dict(self) -> dict[str, int]:
        return {"stride": self.stride, "rounds": self.rounds}


class Overview:
    """Collects a run's history (one row per epoch, one per layer-statistics round, one column per
    recalibration) and draws it: W&B line-series charts and a matplotlib heatmap."""

    def __init__(self, metric: str = "acc"):
        self.metric = metric
        self.epochs: list[dict[str, Any]] = []
        self.layer_steps: list[int] = []
        self.layer_values: dict[str, dict[str, list[float]]] = {stat: {} for stat in LAYER_STATISTICS}
        self.recalibrations: list[tuple[int, dict[str, float]]] = []
        self.epoch_rounds, self.layer_rounds, self.recalibration_count = Thinned(), Thinned(), 0
        self._last_layer_step, self._layer_round_kept = None, True

    # ---- collecting --------------------------------------------------------------------------------------
    def add_epoch(self, epoch: int, train: dict[str, Any], evaluation: dict[str, Any], record: dict[str, Any]) -> bool:
        """One epoch's accuracy (or ``metric``) as trained and as evaluated; False when it has none."""
        eval_key = f"eval_{self.metric}"
        if eval_key not in evaluation:
            return False
        if self.epoch_rounds.next_kept():
            before = next((value for key, value in record.items()  # any deciding hook's, prefixed or not
                           if key.endswith(RecordKeys.before_recal(eval_key)) and value is not None), None)
            self.epochs.append({"epoch": epoch, "train": train.get(f"train_{self.metric}"),
                                "eval": evaluation[eval_key],
                                "as_trained": before if before is not None else evaluation[eval_key]})
            self.epoch_rounds.thin(self.epochs)
        return True

    def add_layer_statistics(self, step: int, stats: dict[str, Any]) -> None:
        """The summary scalars of one :func:`~bnguard.bn_statistics` round. A second round at the same step
        (after a recalibration) replaces the first, as it does in W&B."""
        if step != self._last_layer_step:  # a new round, kept or thinned out
            self._last_layer_step, self._layer_round_kept = step, self.layer_rounds.next_kept()
        if not self._layer_round_kept:
            return
        again = bool(self.layer_steps) and self.layer_steps[-1] == step
        if not again:
            self.layer_steps.append(step)
        for statistic, per_layer in self.layer_values.items():
            for key, value in stats.items():
                if key.startswith("bn/") and key.endswith("/" + statistic):
                    values = per_layer.setdefault(key[3:-len(statistic) - 1], [])
                    if again and values:
                        values[-1] = float(value)
                    else:
                        values.append(float(value))
        self.layer_rounds.thin(self.layer_steps, *(v for per_layer in self.layer_values.values()
                                                   for v in per_layer.values()))

    def add_recalibration(self, step: int, report: RecalibrationReport) -> None:
        self.recalibration_count += 1
        self.recalibrations.append((step, {layer.name: layer.mean_shift_max for layer in report.recalibrated}))
        del self.recalibrations[:-MAX_COLUMNS]

    # ---- checkpointing: a resumed run draws its charts from the whole history ------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"epochs": [dict(row) for row in self.epochs], "layer_steps": list(self.layer_steps),
                "layer_values": {stat: {layer: list(values) for layer, values in per_layer.items()}
                                 for stat, per_layer in self.layer_values.items()},
                "recalibrations": [[step, dict(moved)] for step, moved in self.recalibrations],
                "rounds": {"epochs": self.epoch_rounds.state_dict(), "layers": self.layer_rounds.state_dict(),
                           "recalibrations": self.recalibration_count}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epochs, self.layer_steps = [dict(row) for row in state["epochs"]], list(state["layer_steps"])
        self.layer_values = {stat: {layer: list(values) for layer, values in per_layer.items()}
                             for stat, per_layer in state["layer_values"].items()}
        self.recalibrations = [(step, dict(moved)) for step, moved in state["recalibrations"]]
        rounds = state.get("rounds")  # absent in the state of an older bnguard
        self.epoch_rounds = Thinned(rounds["epochs"] if rounds else None)
        self.layer_rounds = Thinned(rounds["layers"] if rounds else None)
        self.recalibration_count = rounds["recalibrations"] if rounds else len(self.recalibrations)

    # ---- drawing -----------------------------------------------------------------------------------------
    def accuracy_chart(self) -> Any:
        """Train, eval and eval with the statistics as trained, per epoch: the two eval lines part where
        bnguard recalibrated."""
        import wandb

        epochs = [row["epoch"] for row in self.epochs]
        series = [("train", "train"), ("eval", "eval"), ("as_trained", "eval, statistics as trained")]
        kept = [(key, name) for key, name in series if all(row[key] is not None for row in self.epochs)]
        return wandb.plot.line_series(xs=epochs, ys=[[row[key] for row in self.epochs] for key, _ in kept],
                                      keys=[name for _, name in kept], title=f"{self.metric}: train, eval, and eval "
                                      "with the running statistics as trained", xname="epoch")

    def layer_charts(self) -> dict[str, Any]:
        """One chart per statistic, a line per layer, over the logged steps (at most ``CHART_POINTS`` of them:
        W&B keeps every table it is given in memory, and takes seconds to build a large one)."""
        import wandb

        every = max(1, -(-len(self.layer_steps) // CHART_POINTS))
        charts = {}
        for statistic, per_layer in self.layer_values.items():
            if per_layer:
                charts[statistic] = wandb.plot.line_series(
                    xs=self.layer_steps[::every], ys=[values[::every] for values in per_layer.values()],
                    keys=list(per_layer), title=f"{statistic} of every BatchNorm layer", xname="step")
        return charts

    def staleness_figure(self) -> Any:
        """Layers x recalibrations, coloured by how far each recalibration moved each layer's mean (largest
        channel shift, in units of the new standard deviation); None before the first recalibration. A plain
        matplotlib ``Figure``: no pyplot, so the user's backend is left alone."""
        layers = list(dict.fromkeys(name for _, moved in self.recalibrations for name in moved))
        if not layers:  # no recalibration yet, or none that moved a layer (every layer skipped)
            return None
        import numpy as np
        from matplotlib.figure import Figure

        grid = np.array([[moved.get(name, np.nan) for _, moved in self.recalibrations] for name in layers])
        figure = Figure(figsize=(min(4 + 0.45 * grid.shape[1], 14), 1.5 + min(0.25 * len(layers), 14)), dpi=100)
        axes = figure.subplots()
        image = axes.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest")
        every = -(-len(layers) // 56)  # at most 56 layer names fit the capped height
        axes.set_yticks(range(0, len(layers), every), layers[::every], fontsize=7)
        axes.set_xticks(range(grid.shape[1]), [str(step) for step, _ in self.recalibrations], fontsize=7,
                        rotation=90 if grid.shape[1] > 12 else 0)
        if self.recalibration_count > len(self.recalibrations):
            axes.set_title(f"the last {len(self.recalibrations)} of {self.recalibration_count} recalibrations",
                           fontsize=7, loc="right")
        axes.set_xlabel("recalibration at step")
        axes.set_title("how far each recalibration moved each layer's running mean", fontsize=9)
        figure.colorbar(image, ax=axes, label="largest channel shift (new std)")
        figure.tight_layout()
        return figure

    def staleness_image(self) -> Any:
        """The heatmap as an RGB array (height x width x 3, uint8), or None before any recalibration."""
        figure = self.staleness_figure()
        if figure is None:
            return None
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        canvas = FigureCanvasAgg(figure)
        canvas.draw()
        return np.asarray(canvas.buffer_rgba())[..., :3].copy()

    def save_staleness(self, path: str | Path) -> Path | None:
        """Writes the heatmap as a PNG (for people who never open W&B); None before any recalibration."""
        figure = self.staleness_figure()
        if figure is None:
            return None
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path)
        return path


BUFFERS = ("running_mean", "running_var")
LAYER_COLUMNS = ("layer", *(f"{buffer}_{summary}" for buffer in BUFFERS for summary in SUMMARIES), "nonfinite",
                 "last_shift", "last_recalibration_step")


def layer_table(stats: dict[str, Any], overview: Overview) -> list[list[Any]]:
    """One row per BatchNorm layer (:data:`LAYER_COLUMNS`): its buffers' summaries now, from a
    :func:`~bnguard.bn_statistics` round, and how far the latest recalibration that moved it moved its mean."""
    figures = summaries({key: value for key, value in stats.items() if isinstance(value, Histogram)})
    layers = [key[3:-len("/nonfinite")] for key in stats if key.startswith("bn/") and key.endswith("/nonfinite")]
    rows = []
    for name in layers:
        moved = [(step, shifts[name]) for step, shifts in overview.recalibrations if name in shifts]
        step, shift = moved[-1] if moved else (None, None)
        now = [figures.get(f"bn/{name}/{buffer}/{summary}") for buffer in BUFFERS for summary in SUMMARIES]
        rows.append([name, *now, stats[f"bn/{name}/nonfinite"], shift, step])
    return rows


class Snapshots:
    """The at-a-glance files of each moment, for trackers that keep a run's latest files: the layer table as
    CSV, and the heatmap as PNG when a recalibration came since the last one (drawing it takes 0.1 to 0.3 s)."""

    def __init__(self) -> None:
        self.drawn_at: int | None = None  # the overview's recalibration count when the heatmap was last drawn

    def files(self, stats: dict[str, Any], overview: Overview) -> dict[str, bytes]:
        files = {f"{SECTION}/layers.csv": csv_bytes(LAYER_COLUMNS, layer_table(stats, overview))}
        if self.drawn_at != overview.recalibration_count and (figure := overview.staleness_figure()) is not None:
            png = io.BytesIO()
            figure.savefig(png, format="png")
            files[f"{SECTION}/staleness.png"] = png.getvalue()
            self.drawn_at = overview.recalibration_count
        return files

