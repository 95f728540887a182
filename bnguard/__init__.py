"""bnguard: keeps BatchNorm running statistics honest during training."""

from .auto_recalibrate import AutoRecalibrate, Decision
from .bn_stats import BNStatsLogger, bn_statistics, log_bn_stats
from .events import Event
from .hooks import Hook, HookError, Hooks, State
from .loop import Loop
from .metrics import accuracy
from .recalibrate import default_forward, recalibrate
from .report import LayerReport, RecalibrationReport
from .stats import Moments

__version__ = "0.1.0"

__all__ = [
    "AutoRecalibrate",
    "BNStatsLogger",
    "Decision",
    "Event",
    "Hook",
    "HookError",
    "Hooks",
    "LayerReport",
    "Loop",
    "Moments",
    "RecalibrationReport",
    "State",
    "accuracy",
    "bn_statistics",
    "default_forward",
    "log_bn_stats",
    "recalibrate",
]
