"""What a recalibration did, layer by layer, and the warnings it gives about data it could not use as it is."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ..utils.console import text_table


class _ReadWhenAsked:
    """A field of a frozen dataclass that may be given a function of no arguments in place of its value: the
    function runs when the field is first read, and its value is kept (a dataclass descriptor-typed field).
    The error bounds cost more than the rest of a report, and many callers never read them."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, report: Any, owner: type | None = None) -> Any:
        if report is None:
            return None  # the field's default
        value = report.__dict__[self.slot]
        if callable(value):
            value = report.__dict__[self.slot] = value()
        return value

    def __set__(self, report: Any, value: Any) -> None:
        report.__dict__[self.slot] = value


@dataclass(frozen=True)
class LayerReport:
    """One BatchNorm layer's outcome.

    ``mean_shift_*``: |new mean - old mean| in units of the new standard deviation, over channels.
    ``var_log_ratio_*``: |log(new variance / old variance)| over channels. Both are 0 for a skipped layer.
    ``error_bound``: the estimated bound, at 95% confidence, on the largest over channels of the new
    statistics' |mean error| / std and |variance error| / variance against those of unlimited data; None
    for a skipped layer or one that got a single batch (no spread between batches to estimate it from).
    """

    MOVEMENT: ClassVar[tuple[str, ...]] = ("mean_shift_max", "mean_shift_mean", "var_log_ratio_max",
                                           "var_log_ratio_mean")

    name: str
    samples: int = 0
    batches: int = 0
    nonfinite_batches: int = 0
    one_value_batches: int = 0
    mean_shift_max: float = 0.0
    mean_shift_mean: float = 0.0
    var_log_ratio_max: float = 0.0
    var_log_ratio_mean: float = 0.0
    error_bound: float | None = _ReadWhenAsked()  # type: ignore[assignment]
    skipped: str | None = None

    @property
    def recalibrated(self) -> bool:
        return self.skipped is None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_error_bound": self.error_bound}  # a bound not read yet is computed, not pickled


@dataclass(frozen=True)
class RecalibrationReport:
    """Per-layer outcomes plus totals; ``batches`` and ``samples`` count every process's data. ``stopped``
    says why iteration ended: "tolerance met", "num_samples reached", "num_batches reached" or "end of data".
    """

    layers: list[LayerReport] = field(default_factory=list)
    batches: int = 0
    samples: int = 0
    seconds: float = 0.0
    tolerance: float | None = None
    stopped: str = ""

    @property
    def error_bound(self) -> float | None:
        """The largest of the recalibrated layers' bounds; None when one of them has none."""
        bounds = [layer.error_bound for layer in self.recalibrated]
        return max(bounds) if bounds and None not in bounds else None  # type: ignore[type-var]

    @property
    def recalibrated(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.recalibrated]

    @property
    def skipped(self) -> list[LayerReport]:
        return [layer for layer in self.layers if not layer.recalibrated]

    def to_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "samples": self.samples,
            "seconds": self.seconds,
            "tolerance": self.tolerance,
            "stopped": self.stopped,
            "error_bound": self.error_bound,
            "layers": [asdict(layer) for layer in self.layers],
        }

    def __str__(self) -> str:
        header = ("layer", "samples", "bound", "shift max", "shift mean", "|log var| max", "|log var| mean", "note")
        rows = [
            (
                layer.name or "<model>",
                str(layer.samples),
                "-" if layer.error_bound is None else f"{layer.error_bound:.4f}",
                f"{layer.mean_shift_max:.4f}",
                f"{layer.mean_shift_mean:.4f}",
                f"{layer.var_log_ratio_max:.4f}",
                f"{layer.var_log_ratio_mean:.4f}",
                layer.skipped or _left_out(layer),
            )
            for layer in self.layers
        ]
        lines = [
            f"Recalibrated {len(self.recalibrated)} of {len(self.layers)} BatchNorm layers "
            f"from {self.batches} batches ({self.samples} samples) in {self.seconds:.2f} s; error bound "
            f"{'-' if self.error_bound is None else f'{self.error_bound:.4f}'}"
            f"{'' if self.tolerance is None else f' (tolerance {self.tolerance:g})'}, stopped: {self.stopped}"
        ]
        return "\n".join(lines + text_table(header, rows))


def _left_out(layer: LayerReport) -> str:
    kinds = ((layer.nonfinite_batches, "non-finite"), (layer.one_value_batches, "one-value"))
    return "; ".join(f"{count} {kind} batches left out" for count, kind in kinds if count)


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


def warn_instance_norm(modules: list[tuple[str, nn.Module]]) -> None:
    """Names the InstanceNorm layers with running statistics among a model's ``named_modules()``."""
    tracking = [name for name, module in modules if isinstance(module, _InstanceNorm) and module.track_running_stats]
    if tracking:
        warnings.warn(f"InstanceNorm layers with running statistics are not recalibrated: {', '.join(tracking)}",
                      stacklevel=3)
