"""Finding the BatchNorm layers of a model, whatever wraps it."""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import UninitializedBuffer


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / FSDP-style ``.module`` wrappers and ``torch.compile``.

    Accelerate's mixed-precision forward is patched onto the inner module itself, so it survives.
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters are (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def on_meta_device(modules: Iterable[nn.Module]) -> bool:
    """Whether any parameter or buffer of the ``modules`` (a model's, all of them) is on the meta device (holds
    no data). Reads each module's own tensors: a third of the time of ``parameters()`` and ``buffers()``."""
    return any(tensor is not None and tensor.is_meta for module in modules
               for tensors in (module._parameters, module._buffers) for tensor in tensors.values())


def batchnorm_layers(model: nn.Module) -> Iterator[tuple[str, _BatchNorm]]:
    """(dotted name, layer) for every BatchNorm layer (any ``_BatchNorm``) of the unwrapped model."""
    for name, module in unwrap_model(model).named_modules():
        if isinstance(module, _BatchNorm):
            yield name, module


def is_uninitialized(layer: _BatchNorm) -> bool:
    """True for a lazy layer that has not seen its first input yet."""
    return isinstance(layer.running_mean, UninitializedBuffer) or isinstance(
        layer.weight, nn.parameter.UninitializedParameter
    )


def tracks_statistics(layer: _BatchNorm) -> bool:
    return layer.track_running_stats and layer.running_mean is not None


def channels(layer: _BatchNorm) -> int:
    """The channels a layer's statistics hold: ``num_features`` stays 0 in a lazy layer whose buffers were
    materialized by ``load_state_dict`` rather than by a first input."""
    return layer.running_mean.numel()


def has_running_statistics(model: nn.Module) -> bool:
    """Whether any BatchNorm layer of the model keeps running statistics that recalibration could set."""
    return any(tracks_statistics(layer) for _, layer in batchnorm_layers(model))


def frozen_layers(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers whose running statistics are not updating now: eval mode or no tracking."""
    return [layer for _, layer in batchnorm_layers(model) if not (layer.training and tracks_statistics(layer))]


def frozen_the_finetuning_way(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers in eval mode inside a model in train mode: the fine-tuning idiom for keeping
    pretrained statistics (``model.train()``, then the backbone's BatchNorm layers ``.eval()``)."""
    if not unwrap_model(model).training:
        return []
    return [layer for _, layer in batchnorm_layers(model) if not layer.training]


def train_keeping_frozen(model: nn.Module, frozen: list[_BatchNorm]) -> None:
    """``model.train()``, with the ``frozen`` BatchNorm layers left in eval mode."""
    model.train()
    for layer in frozen:
        layer.eval()


def side_by_side(buffers: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The layers' buffers concatenated in float64 on ``device``: one concatenation when they share dtype and
    device (the usual case), else each one converted first."""
    if all(b.device == device and b.dtype == buffers[0].dtype for b in buffers):
        return torch.cat(buffers).detach().double()
    return torch.cat([b.detach().to(device, torch.float64) for b in buffers])
