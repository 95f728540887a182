"""Which BatchNorm layers training leaves alone, so that recalibration leaves them alone too."""

from __future__ import annotations

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
