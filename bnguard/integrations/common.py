"""What the framework adapters share: train metrics averaged between evaluations, and the hook state they
put into the framework's checkpoints."""

from __future__ import annotations

from typing import Any

import torch

from ..distributed import process_info, sum_over_processes
from ..hooks import HookRunner
from ..records import plain


def missing_extra(framework: str, extra: str) -> ImportError:
    return ImportError(f"bnguard.integrations.{framework} needs its framework: pip install 'bnguard[{extra}]'")


class RunningMeans:
    """Per-name means of values seen since the last :meth:`take`, over every process. Tensors are added where
    they live, so that watching a metric every step costs no device synchronization."""

    def __init__(self) -> None:
        self._sums: dict[str, Any] = {}
        self._counts: dict[str, float] = {}

    def add(self, name: str, value: Any, weight: float = 1.0) -> None:
        value = value.detach() if isinstance(value, torch.Tensor) else value
        self._sums[name] = self._sums.get(name, 0.0) + value * weight
        self._counts[name] = self._counts.get(name, 0.0) + weight

    def means(self, accelerator: Any = None) -> dict[str, float]:
        """The means over every process (each must call it, having seen the same names)."""
        names = sorted(self._sums)
        if not names:
            return {}
        sums = torch.stack([torch.as_tensor(self._sums[n], dtype=torch.float64).cpu() for n in names])
        counts = torch.tensor([self._counts[n] for n in names], dtype=torch.float64)
        totals = sum_over_processes(torch.cat([sums, counts]), process_info(accelerator)[1])
        return {name: float(totals[i] / totals[len(names) + i]) for i, name in enumerate(names)}

    def take(self, accelerator: Any = None) -> dict[str, float]:
        """:meth:`means`, then starts afresh."""
        means = self.means(accelerator)
        self._sums, self._counts = {}, {}
        return means


def without_evaluation(values: dict[str, Any]) -> dict[str, Any]:
    """Hooks' tracker values less the evaluation metrics, which the adapters log the framework's own way."""
    return {key: value for key, value in values.items() if not key.startswith("eval_")}


def hook_state(runner: HookRunner, batches: Any, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything a resumed run needs to continue the hooks' decisions, as plain data: frameworks load
    checkpoints with ``torch.load(weights_only=True)``, which refuses any other class."""
    return plain({"hooks": runner.state_dict(), "batches": batches.state_dict() if batches is not None else None,
                  "records": list(records)})
