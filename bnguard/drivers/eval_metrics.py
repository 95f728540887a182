"""Your evaluation's metrics as the hooks name them, and the hooks' values back in your names."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import torch

Metrics = Mapping[str, Any] | float
EVAL_PREFIXES = ("eval_", "val_")


def eval_metrics(given: Metrics, metric_name: str) -> dict[str, float]:
    """Your evaluation's result as the hooks name it: ``eval_<name>`` for every number in a mapping
    (``val_<name>`` renamed), or ``{eval_<metric_name>: value}`` for one number."""
    if not isinstance(given, Mapping):
        return {f"eval_{metric_name}": _number(given)}
    return {_eval_key(key): _number(value) for key, value in given.items() if _is_number(value)}


def in_given_shape(given: Metrics, metrics: dict[str, float], metric_name: str) -> Metrics:
    """``metrics`` back in the shape and names of ``given``; a value no hook changed stays as given."""
    if not isinstance(given, Mapping):
        return metrics[f"eval_{metric_name}"]
    shaped = dict(given)
    for key, value in given.items():
        new = metrics.get(_eval_key(key))
        if _is_number(value) and new is not None and new != _number(value):
            shaped[key] = new
    return shaped


def _eval_key(key: str) -> str:
    for prefix in EVAL_PREFIXES:
        if key.startswith(prefix):
            return "eval_" + key[len(prefix):]
    return "eval_" + key


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) or (isinstance(value, torch.Tensor) and value.numel() == 1)


def _number(value: Any) -> float:
    if not _is_number(value):
        raise TypeError(f"an evaluation gave {type(value).__name__} where a number was expected: return a "
                        "float or a dict of floats from evaluate")
    return float(value)
