"""Finding the model's tensors in what a checkpoint file holds, and putting recalibrated statistics back."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from ..recalibration.layers import batchnorm_layers, tracks_statistics
from .checkpoints import Checkpoint, WeightsFile
from .errors import InputError
from .forms import AVERAGED, MODEL

_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class Location:
    """Where the model's state dict lies: a file of the checkpoint, a top-level key of what the file holds
    (None: the file holds the state dict itself), and the prefix of its keys there."""

    file: int
    key: str | None
    prefix: str

    def describe(self, checkpoint: Checkpoint) -> str:
        inside = "" if self.key is None else f"[{self.key!r}]"
        return f"{checkpoint.files[self.file].path.name}{inside}, keys {self.prefix or '(no prefix)'}*"


def load_model_state(model: nn.Module, checkpoint: Checkpoint, target: str) -> Location:
    """Loads the model's tensors from the checkpoint (the averaged model's with ``target="averaged"``) and
    says where they were; refuses a checkpoint that does not match, naming the first mismatching keys."""
    expected = model.state_dict()
    required = _untied(expected)
    if not required:
        raise InputError(f"the model ({type(model).__name__}) has no parameters or buffers to load")
    best: tuple[int, str] | None = None
    for file, key, state, role in _tensor_mappings(checkpoint):
        for prefix in _prefixes(state, required[0], target, role):
            problems = _mismatch(state, prefix, expected, required)
            if not problems:
                model.load_state_dict({name: state[prefix + name] for name in required}, strict=False)
                return Location(file, key, prefix)
            if best is None or problems[0] < best[0]:
                best = problems
    if best is None:
        wanted = "no AveragedModel state (n_averaged and module.* keys)" if target == AVERAGED else \
            f"none of the model's keys (e.g. {required[0]})"
        raise InputError(f"{checkpoint.path} holds {wanted}: check --model / --model-kwargs"
                         + ("" if target == AVERAGED else ", or --target averaged for an averaged model's file"))
    raise InputError(f"{checkpoint.path} does not match the model: {best[1]}; check --model / --model-kwargs")


def _tensor_mappings(checkpoint: Checkpoint) -> list[tuple[int, str | None, Mapping[str, torch.Tensor], str | None]]:
    """(file, key, state dict, what it holds when the layout says so) for every state dict in the files."""
    found = []
    for index, weights in enumerate(checkpoint.files):
        content = weights.content
        if _is_state(content):
            found.append((index, None, content, None))
        elif isinstance(content, Mapping):
            roles = _LIGHTNING_AVERAGING if _LIGHTNING_AVERAGING.keys() <= content.keys() else {}
            found += [(index, key, value, roles.get(key)) for key, value in content.items() if _is_state(value)]
    return found


# Lightning's WeightAveraging callback saves the average as the state dict and the trained model beside it.
_LIGHTNING_AVERAGING = {"state_dict": AVERAGED, "current_model_state": MODEL, "averaging_state": None}


def _is_state(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _prefixes(state: Mapping[str, torch.Tensor], anchor: str, target: str, role: str | None) -> list[str]:
    """Prefixes under which ``anchor`` appears, in a state dict that holds the target (``role``, when the
    layout says what it holds); else an AveragedModel's own ones (``<p>module.`` beside ``<p>n_averaged``) only
    for the averaged target, and only those for it."""
    found = sorted({key[:-len(anchor)] for key in state
                    if key.endswith(anchor) and (len(key) == len(anchor) or key[-len(anchor) - 1] == ".")}, key=len)
    if role is not None:
        return found if role == target else []
    averaged = [p for p in found if p.endswith("module.") and p[:-len("module.")] + "n_averaged" in state]
    return averaged if target == AVERAGED else [p for p in found if p not in averaged]


def _mismatch(state: Mapping[str, torch.Tensor], prefix: str, expected: Mapping[str, torch.Tensor],
              required: list[str]) -> tuple[int, str] | None:
    missing = [name for name in required if prefix + name not in state]
    inside = [key[len(prefix):] for key in state if key.startswith(prefix)]
    unexpected = [name for name in inside if name not in expected and not _nested_averaged(name)]
    if missing or unexpected:
        parts = [f"{label} {_first(names)}" for label, names in
                 (("missing from the checkpoint:", missing), ("not in the model:", unexpected)) if names]
        return len(missing) + len(unexpected), "; ".join(parts)
    for name in required:
        stored, wanted = state[prefix + name], expected[name]
        if not is_lazy(wanted) and stored.shape != wanted.shape:  # a lazy module takes its shape from the file
            return 1, (f"{prefix + name} has shape {list(stored.shape)} in the checkpoint, the model's {name} has "
                       f"{list(wanted.shape)}")
    return None


def _nested_averaged(name: str) -> bool:
    """An averaged copy held inside the model's own state (a LightningModule's ``self.ema``) is not foreign."""
    return name.endswith("n_averaged") or ".module." in f".{name}"


def _first(names: list[str], shown: int = 3) -> str:
    more = f" (and {len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _untied(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The state's keys less those whose tensor shares storage with an earlier key (tied weights, which
    saving frameworks store once)."""
    seen, keys = set(), []
    for name, tensor in state.items():
        pointer = None if is_lazy(tensor) or not tensor.numel() else (tensor.data_ptr(), tensor.shape)
        if pointer is None or pointer not in seen:
            keys.append(name)
        seen.add(pointer)
    return keys


def with_statistics(model: nn.Module, checkpoint: Checkpoint, location: Location) -> WeightsFile:
    """The located file with the model's BatchNorm statistics in place of the stored ones (each in the stored
    dtype); every other entry the very object that was read."""
    weights = checkpoint.files[location.file]
    state = dict(weights.content if location.key is None else weights.content[location.key])
    for name, layer in batchnorm_layers(model):
        if not tracks_statistics(layer):
            continue
        for buffer in _STATISTICS:
            key = f"{location.prefix}{name + '.' if name else ''}{buffer}"
            if key in state:
                state[key] = getattr(layer, buffer).detach().to("cpu", state[key].dtype).clone()
    content = state if location.key is None else {**weights.content, location.key: state}
    return WeightsFile(weights.path, content, weights.metadata)
