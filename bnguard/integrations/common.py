"""What the framework adapters share: train metrics averaged between evaluations, and the hook state they
put into the framework's checkpoints."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..drivers.records import plain
from ..drivers.runner import HookRunner
from ..utils.distributed import process_info, sum_over_processes


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

    def state_dict(self) -> dict[str, dict[str, float]]:
        """This process's sums and counts since the last :meth:`take`, as plain numbers: a run resumed
        between two evaluations averages the same values as one never interrupted."""
        return {"sums": {name: float(value) for name, value in self._sums.items()}, "counts": dict(self._counts)}

    def load_state_dict(self, state: dict[str, dict[str, float]]) -> None:
        self._sums, self._counts = dict(state["sums"]), dict(state["counts"])


def without_evaluation(values: dict[str, Any]) -> dict[str, Any]:
    """Hooks' tracker values less the evaluation metrics, which the adapters log the framework's own way."""
    return {key: value for key, value in values.items() if not key.startswith("eval_")}


def hook_state(runner: HookRunner, batches: Any, records: list[dict[str, Any]], train: RunningMeans
               ) -> dict[str, Any]:
    """Everything a resumed run needs to continue the hooks' decisions, as plain data (frameworks load
    checkpoints with ``torch.load(weights_only=True)``, which refuses any other class): the hooks' states,
    the recalibration draws, the records, the train metrics gathered since the last evaluation, and the
    open epoch's metrics and record (a checkpoint may fall mid-epoch)."""
    state = runner.state
    return plain({"hooks": runner.state_dict(), "batches": batches.state_dict() if batches is not None else None,
                  "records": list(records), "train": train.state_dict(),
                  "epoch": {"train_metrics": dict(state.train_metrics), "eval_metrics": dict(state.eval_metrics),
                            "record": dict(state.record)}})


def load_hook_state(saved: dict[str, Any], runner: HookRunner, batches: Any, train: RunningMeans) -> list[dict]:
    """Restores what :func:`hook_state` saved (older files hold less); returns the records."""
    runner.load_state_dict(saved["hooks"])
    if batches is not None and saved["batches"] is not None:
        batches.load_state_dict(saved["batches"])
    if "train" in saved:
        train.load_state_dict(saved["train"])
    if "epoch" in saved:
        runner.state.update(**{key: dict(value) for key, value in saved["epoch"].items()})
    return list(saved["records"])


def warn_never_evaluated(hooks: list[Any], why: str) -> None:
    """Says once, at fit start, that the hooks that act at evaluations never will, and why."""
    idle = [hook.state_key for hook in hooks if hook.acts_at_evaluation]
    if idle:
        warnings.warn(f"{', '.join(idle)} will never run: {why}; they act only when the trainer evaluates",
                      stacklevel=3)
