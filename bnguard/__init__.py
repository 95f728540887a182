"""bnguard: keeps BatchNorm running statistics honest during training."""

from .recalibrate import default_forward, recalibrate
from .report import LayerReport, RecalibrationReport
from .stats import Moments

__version__ = "0.1.0"

__all__ = ["LayerReport", "Moments", "RecalibrationReport", "default_forward", "recalibrate"]
