"""What bnguard's hooks send to MLflow and Aim beyond the scalars Accelerate's trackers carry: MLflow has no
histogram type, so each histogram becomes summary metrics (and the pictures and tables become artifacts);
Aim has one, its ``Distribution``. Each function takes the run Accelerate's tracker opened, never another;
the packages are imported only here, when a run is there to log to."""

from __future__ import annotations

import csv
import io
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .trackers import Histogram

SUMMARIES = ("mean", "std", "min", "max")  # <histogram key>/<summary>: MLflow's metric per buffer and layer
MLFLOW_BATCH = 1000  # the most metrics one log_batch call takes


def summaries(histograms: dict[str, Histogram]) -> dict[str, float]:
    """Mean, standard deviation and extremes of each histogram's finite values, from its exact totals
    (nothing for a histogram without a finite value)."""
    out = {}
    for key, h in histograms.items():
        if h.num == 0:
            continue
        mean = h.sum / h.num
        std = math.sqrt(max(h.sum_squares / h.num - mean * mean, 0.0))
        out.update(zip((f"{key}/{name}" for name in SUMMARIES), (mean, std, h.minimum, h.maximum)))
    return out


def csv_bytes(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(columns)
    writer.writerows(rows)
    return text.getvalue().encode()


def mlflow_metrics(run_id: str, values: dict[str, float], step: int) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    metrics = [Metric(key, float(value), stamp, step) for key, value in values.items()]
    client = MlflowClient()
    for start in range(0, len(metrics), MLFLOW_BATCH):
        client.log_batch(run_id, metrics=metrics[start:start + MLFLOW_BATCH])


def mlflow_tags(run_id: str, tags: dict[str, str]) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import RunTag

    MlflowClient().log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])


def mlflow_image(run_id: str, key: str, image: np.ndarray, step: int) -> None:
    from mlflow import MlflowClient

    MlflowClient().log_image(run_id, image, key=key, step=step)


def mlflow_files(run_id: str, files: dict[str, bytes]) -> None:
    """Writes each file at its path among the run's artifacts, replacing the one written before."""
    from mlflow import MlflowClient

    client = MlflowClient()
    with tempfile.TemporaryDirectory() as folder:
        for name, content in files.items():
            path = Path(folder) / Path(name).name
            path.write_bytes(content)
            folder_in_run = str(Path(name).parent)
            client.log_artifact(run_id, str(path), artifact_path=None if folder_in_run == "." else folder_in_run)


def aim_distributions(run: Any, histograms: dict[str, Histogram], step: int) -> None:
    from aim import Distribution

    for key, h in histograms.items():
        run.track(Distribution(hist=h.counts, bin_range=(float(h.edges[0]), float(h.edges[-1]))), name=key,
                  step=step)


def aim_image(run: Any, key: str, image: np.ndarray, step: int) -> None:
    from aim import Image

    run.track(Image(image), name=key, step=step)


def aim_params(run: Any, values: dict[str, Any]) -> None:
    """Run parameters, shown beside the run in Aim (tags, tables); a key's later value replaces it."""
    for key, value in values.items():
        run[key] = value
