"""What recalibration tells the user about data it could not use as it is."""

from __future__ import annotations

import warnings

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .report import LayerReport


def warn_left_out(layers: list[LayerReport]) -> None:
    one_value = [layer.name for layer in layers if layer.one_value_batches]
    if one_value:
        warnings.warn(f"{len(one_value)} BatchNorm layer(s) got batches with one value per channel (a batch of "
                      f"one sample), which BatchNorm cannot normalize in train mode: left out, at {one_value[0]!r}"
                      f"{' and others' if len(one_value) > 1 else ''}", stacklevel=3)
    affected = [layer for layer in layers if layer.nonfinite_batches]
    if affected:
        worst = max(affected, key=lambda layer: layer.nonfinite_batches)
        warnings.warn(
            f"{len(affected)} BatchNorm layer(s) saw batches with non-finite statistics (NaN/Inf input), "
            f"left out of the estimate: up to {worst.nonfinite_batches} batch(es), at {worst.name!r}",
            stacklevel=3,
        )


def warn_ordered(ordered: list[_BatchNorm], model: nn.Module) -> None:
    if ordered:
        name = next(name for name, module in model.named_modules() if module is ordered[0])
        warnings.warn(f"the batches look ordered, not drawn at random: at {len(ordered)} BatchNorm layer(s), from "
                      f"{name!r}, each batch's statistics resemble the previous batch's far more than chance "
                      "allows; the estimate pools them all the same, but its error bound assumes shuffled "
                      "batches: pass a loader with shuffle=True", stacklevel=3)


def warn_instance_norm(model: nn.Module) -> None:
    tracking = [name for name, module in model.named_modules()
                if isinstance(module, _InstanceNorm) and module.track_running_stats]
    if tracking:
        warnings.warn(f"InstanceNorm layers with running statistics are not recalibrated: {', '.join(tracking)}",
                      stacklevel=3)
