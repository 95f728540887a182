"""What the command line prints, and the JSON report it saves."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..layers import batchnorm_layers, tracks_statistics


def statistics_table(model: nn.Module) -> str:
    """One row per BatchNorm layer: its channels, the average over channels of its running mean and
    variance, the smallest variance, and how many batches it has tracked."""
    header = ("layer", "channels", "mean of mean", "mean of var", "min var", "batches tracked")
    rows = []
    for name, layer in batchnorm_layers(model):
        if not tracks_statistics(layer):
            rows.append((name or "<model>", str(layer.num_features), "-", "-", "-", "no running statistics"))
            continue
        mean, var = layer.running_mean.double(), layer.running_var.double()
        tracked = layer.num_batches_tracked
        rows.append((name or "<model>", str(layer.num_features), f"{mean.mean().item():.4g}",
                     f"{var.mean().item():.4g}", f"{var.min().item():.4g}",
                     "-" if tracked is None else str(int(tracked))))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [f"{len(rows)} BatchNorm layers"]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def accuracy_line(which: str, metrics: dict[str, Any], before: dict[str, Any] | None = None) -> str:
    change = "" if before is None else f", {100 * (metrics['accuracy'] - before['accuracy']):+.2f} points"
    return (f"eval accuracy {100 * metrics['accuracy']:.2f}% (loss {metrics['loss']:.4f}) on {metrics['samples']} "
            f"samples with the {which}{change}")


def save_report(findings: dict[str, Any], path: Path) -> None:
    """Written beside its final name and renamed into place: a report is whole or absent."""
    partial = path.parent / f".{path.name}.partial"
    partial.write_text(json.dumps(findings, indent=1, allow_nan=False))
    os.replace(partial, path)
