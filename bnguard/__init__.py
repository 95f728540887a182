"""bnguard: keeps BatchNorm running statistics honest during training.

Public names are imported on first use (``bnguard.Loop`` imports the loop, and with it torch and accelerate),
so that the ``bnguard`` command answers ``--help`` before any of them loads."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .auto_recalibrate import AutoRecalibrate
    from .batches import TrainingBatches, default_forward
    from .bn_stats import BNStatsLogger, bn_statistics, log_bn_stats
    from .events import Event
    from .guard import Guard
    from .hooks import Hook, HookError, HookRunner
    from .loop import Loop
    from .metrics import NonFiniteLossError, accuracy
    from .policy import Decision, DivergencePolicy, Verdict
    from .precise_bn import PreciseBN
    from .recalibration import recalibrate
    from .records import RecordKeys
    from .report import LayerReport, RecalibrationReport
    from .run_dir import shared_output_dir
    from .state import State
    from .stopping import HOOK_TOLERANCE
    from .tracking import Trackers, start_trackers
    from .train_step import loss_from_model

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
    "AutoRecalibrate": "auto_recalibrate",
    "TrainingBatches": "batches",
    "default_forward": "batches",
    "BNStatsLogger": "bn_stats",
    "bn_statistics": "bn_stats",
    "log_bn_stats": "bn_stats",
    "Event": "events",
    "Guard": "guard",
    "Hook": "hooks",
    "HookError": "hooks",
    "HookRunner": "hooks",
    "Loop": "loop",
    "NonFiniteLossError": "metrics",
    "accuracy": "metrics",
    "Decision": "policy",
    "DivergencePolicy": "policy",
    "Verdict": "policy",
    "PreciseBN": "precise_bn",
    "recalibrate": "recalibration",
    "RecordKeys": "records",
    "LayerReport": "report",
    "RecalibrationReport": "report",
    "shared_output_dir": "run_dir",
    "State": "state",
    "HOOK_TOLERANCE": "stopping",
    "Trackers": "tracking",
    "start_trackers": "tracking",
    "loss_from_model": "train_step",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    else:  # a submodule, e.g. bnguard.recalibration after a bare ``import bnguard``
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
