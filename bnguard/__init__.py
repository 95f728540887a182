"""bnguard: keeps BatchNorm running statistics honest during training."""

from .events import Event
from .hooks import Hook, HookError, Hooks, State
from .loop import Loop
from .metrics import accuracy
from .recalibrate import default_forward, recalibrate
from .report import LayerReport, RecalibrationReport
from .stats import Moments

__version__ = "0.1.0"

__all__ = [
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
    "default_forward",
    "recalibrate",
]
