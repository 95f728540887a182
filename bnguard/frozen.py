"""What hooks recalibrate: the trained model or another one (averaged weights), and which of its BatchNorm
layers training leaves alone, so that recalibration leaves them alone too."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .layers import frozen_layers
from .state import State


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
                         ) -> tuple[nn.Module, list[_BatchNorm] | None]:
    """The model to recalibrate, and the layers to leave alone in it: the training model with the layers
    that were not updating, or ``target`` (a model, or a callable giving it, e.g. an EMA or
    ``AveragedModel`` copy) with recalibration's own rule, since its layers are not the trained ones."""
    if target is None:
        return state.model, frozen.layers
    return (target() if callable(target) and not isinstance(target, nn.Module) else target), None
