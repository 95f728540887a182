"""What the command line prints, and the JSON report it saves."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..recalibration.layers import batchnorm_layers, tracks_statistics
from ..utils.console import text_table


def layer_statistics(model: nn.Module) -> list[dict[str, Any]]:
    """Per BatchNorm layer: its channels, the average over channels of its running mean and variance, the
    smallest variance, and how many batches it has tracked (None where it keeps no running statistics)."""
    rows = []
    for name, layer in batchnorm_layers(model):
        # channels from the buffers when there are: a lazy layer loaded from a file keeps num_features 0
        row: dict[str, Any] = {"layer": name or "<model>", "channels": layer.num_features, "mean_of_mean": None,
                               "mean_of_var": None, "min_var": None, "batches_tracked": None}
        if tracks_statistics(layer):
            mean, var = layer.running_mean.double(), layer.running_var.double()
            tracked = layer.num_batches_tracked
            row.update(channels=mean.numel(), mean_of_mean=mean.mean().item(), mean_of_var=var.mean().item(),
                       min_var=var.min().item(), batches_tracked=None if tracked is None else int(tracked))
        rows.append(row)
    return rows


def statistics_table(rows: list[dict[str, Any]]) -> str:
    header = ("layer", "channels", "mean of mean", "mean of var", "min var", "batches tracked")
    cells = [tuple("-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
                   for value in row.values()) for row in rows]
    return "\n".join([f"{len(rows)} BatchNorm layers", *text_table(header, cells)])


def accuracy_line(which: str, metrics: dict[str, Any], before: dict[str, Any] | None = None) -> str:
    change = "" if before is None else f", {100 * (metrics['accuracy'] - before['accuracy']):+.2f} points"
    return (f"eval accuracy {100 * metrics['accuracy']:.2f}% (loss {metrics['loss']:.4f}) on {metrics['samples']} "
            f"samples with the {which}{change}")


def save_report(findings: dict[str, Any], path: Path) -> None:
    """Written beside its final name and renamed into place: a report is whole or absent."""
    partial = path.parent / f".{path.name}.partial"
    partial.write_text(json.dumps(findings, indent=1, allow_nan=False))
    os.replace(partial, path)
