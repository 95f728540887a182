"""bnguard: keeps BatchNorm running statistics honest during training.

Public names are imported on first use (``bnguard.Loop`` imports the loop, and with it torch and accelerate),
so that the ``bnguard`` command answers ``--help`` before any of them loads."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .drivers.guard import Guard
    from .drivers.loop import Loop
    from .drivers.metrics import NonFiniteLossError
    from .drivers.run_dir import shared_output_dir
    from .drivers.runner import HookError, HookRunner
    from .drivers.tracker_setup import start_trackers
    from .drivers.train_step import loss_from_model
    from .drivers.training_batches import TrainingBatches
    from .hooks.auto_recalibrate import AutoRecalibrate
    from .hooks.base import Hook
    from .hooks.bn_stats import BNStatsLogger, bn_statistics, log_bn_stats
    from .hooks.events import Event
    from .hooks.policy import Decision, DivergencePolicy, Verdict
    from .hooks.precise_bn import PreciseBN
    from .hooks.recalibrating import HOOK_TOLERANCE
    from .hooks.record_keys import RecordKeys
    from .hooks.state import State
    from .hooks.trackers import Trackers
    from .recalibration.batches import accuracy, default_forward
    from .recalibration.recalibrate import recalibrate
    from .recalibration.report import LayerReport, RecalibrationReport

__version__ = "0.1.0"

__all__ = [
    "HOOK_TOLERANCE",
    "AutoRecalibrate",
    "BNStatsLogger",
    "Decision",
    "DivergencePolicy",
    "Event",
    "Guard",
    "Hook",
    "HookError",
    "HookRunner",
    "LayerReport",
    "Loop",
    "NonFiniteLossError",
    "PreciseBN",
    "RecalibrationReport",
    "RecordKeys",
    "State",
    "Trackers",
    "TrainingBatches",
    "Verdict",
    "accuracy",
    "bn_statistics",
    "default_forward",
    "log_bn_stats",
    "loss_from_model",
    "recalibrate",
    "shared_output_dir",
    "start_trackers",
]


# Where each public name lives.
_WHERE = {
    "Guard": "drivers.guard",
    "Loop": "drivers.loop",
    "NonFiniteLossError": "drivers.metrics",
    "shared_output_dir": "drivers.run_dir",
    "HookError": "drivers.runner",
    "HookRunner": "drivers.runner",
    "start_trackers": "drivers.tracker_setup",
    "loss_from_model": "drivers.train_step",
    "TrainingBatches": "drivers.training_batches",
    "AutoRecalibrate": "hooks.auto_recalibrate",
    "Hook": "hooks.base",
    "BNStatsLogger": "hooks.bn_stats",
    "bn_statistics": "hooks.bn_stats",
    "log_bn_stats": "hooks.bn_stats",
    "Event": "hooks.events",
    "Decision": "hooks.policy",
    "DivergencePolicy": "hooks.policy",
    "Verdict": "hooks.policy",
    "PreciseBN": "hooks.precise_bn",
    "HOOK_TOLERANCE": "hooks.recalibrating",
    "RecordKeys": "hooks.record_keys",
    "State": "hooks.state",
    "Trackers": "hooks.trackers",
    "accuracy": "recalibration.batches",
    "default_forward": "recalibration.batches",
    "recalibrate": "recalibration.recalibrate",
    "LayerReport": "recalibration.report",
    "RecalibrationReport": "recalibration.report",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    else:  # a subpackage, e.g. bnguard.cli after a bare ``import bnguard``
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value  # found once: later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
