"""bnguard: keeps BatchNorm running statistics honest during training."""

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
