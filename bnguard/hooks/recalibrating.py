"""What the recalibrating hooks share: their settings, what they recalibrate (the trained model or another
one, e.g. averaged weights) and which of its BatchNorm layers training leaves alone, so that recalibration
leaves them alone too."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..recalibration.batches import Forward
from ..recalibration.layers import batchnorm_layers, frozen_layers, unwrap_model
from ..recalibration.recalibrate import recalibrate
from ..recalibration.report import RecalibrationReport
from ..utils.console import WarnOnce
from ..utils.validation import fraction, positive_int
from .base import Hook
from .state import NO_TRAIN_BATCHES, State

# The hooks' default: the largest measured that kept the eval accuracy of a full pass, on the example and
# on resnet18, with 512 to 640 samples (README, "How the hooks' tolerance was chosen").
HOOK_TOLERANCE = 0.3


class FrozenDuringTraining:
    """The BatchNorm layers that were not updating their statistics during the training steps (eval mode,
    as fine-tuning freezes them), looked at once per epoch, at its first step. None until a step was seen:
    recalibration then applies its own rule."""

    def __init__(self) -> None:
        self.layers: list[_BatchNorm] | None = None
        self._epoch: int | None = None

    def observe(self, state: State) -> None:
        if state.epoch != self._epoch:
            self._epoch = state.epoch
            self.layers = frozen_layers(state.model)


Target = nn.Module | Callable[[], nn.Module] | None


def recalibration_target(target: Target, state: State, frozen: FrozenDuringTraining
                         ) -> tuple[nn.Module, list[_BatchNorm]]:
    """The model to recalibrate, and the layers to leave alone in it: the training model with the layers
    that were not updating, or ``target`` (a model, or a callable giving it, e.g. an EMA or
    ``AveragedModel`` copy) with its layers that match those. The target's own modes say nothing: an EMA
    wrapper may keep its copy in eval mode for good (timm's ``ModelEmaV3``)."""
    trained = frozen.layers
    if trained is None:  # no training step seen yet: the trained model's modes now
        trained = frozen_layers(state.model) if unwrap_model(state.model).training else []
    if target is None:
        return state.model, trained
    model = target() if callable(target) and not isinstance(target, nn.Module) else target
    return model, matching_layers(trained, state.model, model)


def matching_layers(layers: list[_BatchNorm], model: nn.Module, other: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of ``other`` that correspond to ``layers`` of ``model``: by position when both
    have as many, else by name (``other``'s name equal to, or ending in, the trained layer's)."""
    if other is model:
        return list(layers)
    ours, theirs = list(batchnorm_layers(model)), list(batchnorm_layers(other))
    chosen = {id(layer) for layer in layers}
    if len(ours) == len(theirs):
        return [their for (_, our), (_, their) in zip(ours, theirs) if id(our) in chosen]
    names = [name for name, layer in ours if id(layer) in chosen]
    return [layer for their_name, layer in theirs
            if any(their_name == name or their_name.endswith("." + name) for name in names)]


def nothing_recalibrated(report: RecalibrationReport) -> str | None:
    """Why a recalibration changed no layer at all (every one skipped, with the reasons and counts), or None
    when it changed one."""
    if report.recalibrated or not report.layers:
        return None
    reasons = Counter(layer.skipped for layer in report.layers)
    return f"all {len(report.layers)} BatchNorm layers skipped (" + "; ".join(
        f"{count} {reason}" for reason, count in reasons.items()) + ")"


class RecalibratingHook(Hook):
    """Base of the hooks that recalibrate (:class:`~bnguard.AutoRecalibrate`, :class:`~bnguard.PreciseBN`):
    their shared settings, the check that there are training batches, the frozen layers' observation at every
    step, and one recalibration call that warns once when it changes nothing.

    Args:
        tolerance: stop once every layer's error bound is within it (see :func:`~bnguard.recalibrate`); None
            takes ``num_samples`` whatever the precision.
        num_samples: the most training samples one recalibration uses.
        include_frozen: recalibrate also the BatchNorm layers that were not updating during training.
        target: another model to recalibrate than the trained one (or a callable giving it), e.g. an EMA copy.
    """

    acts_at_evaluation = writes_decisions = True

    def __init__(self, *, tolerance: float | None, num_samples: int, include_frozen: bool, target: Target):
        self.tolerance = fraction("tolerance", tolerance, optional=True)
        self.num_samples = positive_int("num_samples", num_samples)
        self.include_frozen = include_frozen
        self.target = target
        self._frozen = FrozenDuringTraining()
        self._warn_once = WarnOnce()

    @property
    def needs_train_batches(self) -> bool:
        return True

    def on_fit_start(self, state: State) -> None:
        if self.needs_train_batches and not state.has_train_batches:
            raise ValueError(f"{type(self).__name__} needs training batches to recalibrate on: {NO_TRAIN_BATCHES}")

    def on_step_end(self, state: State) -> None:
        self._frozen.observe(state)

    def _target(self, state: State) -> tuple[nn.Module, list[_BatchNorm]]:
        return recalibration_target(self.target, state, self._frozen)

    def _recalibrate_statistics(self, model: nn.Module, batches: Iterable[Any], *, accelerator: Any,
                                frozen: Iterable[nn.Module] | None, forward: Forward | None
                                ) -> tuple[RecalibrationReport, str | None]:
        """The report of one recalibration, and why it changed no layer (None when it changed one)."""
        report = recalibrate(model, batches, tolerance=self.tolerance, num_samples=self.num_samples,
                             accelerator=accelerator, frozen=frozen, forward=forward,
                             include_frozen=self.include_frozen, progress=False)
        why_not = nothing_recalibrated(report)
        if why_not is not None:
            self._warn_once("nothing", f"{type(self).__name__} recalibrated nothing in {type(model).__name__}: "
                            f"{why_not}; include_frozen=True recalibrates frozen layers too")
        return report, why_not
