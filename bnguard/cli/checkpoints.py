"""Saved models as they come: a bnguard Loop checkpoint folder, a Lightning ``.ckpt``, a Hugging Face
``save_pretrained`` folder, or a plain state dict (``.pt`` / ``.safetensors``); read, and written back whole or
not at all in the same form."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..utils.manifest import MANIFEST, RECORDS_COPY, CheckpointError, verify_checkpoint, write_manifest
from .errors import InputError

LOOP, LIGHTNING, HF, STATE_DICT = "bnguard Loop checkpoint", "Lightning checkpoint", "Hugging Face folder", "state dict"
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


@dataclass
class WeightsFile:
    """One file of tensors: what it holds, and the safetensors metadata to write back with it."""

    path: Path
    content: Any
    metadata: dict[str, str] | None = None


@dataclass
class Checkpoint:
    path: Path
    kind: str
    files: list[WeightsFile] = field(default_factory=list)


def open_checkpoint(path: Path) -> Checkpoint:
    if not path.exists():
        raise InputError(f"checkpoint {path} does not exist")
    if path.is_dir():
        return _open_folder(path)
    kind = LIGHTNING if path.suffix == ".ckpt" else STATE_DICT
    return Checkpoint(path, kind, [_read(path)])


def _open_folder(path: Path) -> Checkpoint:
    if (path / MANIFEST).is_file():
        try:
            verify_checkpoint(path)
        except CheckpointError as error:
            raise InputError(f"{error}: repair a checkpoint that verifies, e.g. the one before it") from None
        names = sorted(p.name for p in path.iterdir() if p.name.startswith(("model", "pytorch_model"))
                       and p.suffix in (".safetensors", ".bin"))
        return Checkpoint(path, LOOP, [_read(path / name) for name in names] + _registered_objects(path))
    if (path / "config.json").is_file():
        if any(path.glob("*.index.json")):
            raise InputError(f"{path} holds sharded weights, which bnguard does not read: save the model again "
                             "with save_pretrained(..., max_shard_size='100GB') to get one file")
        for name in _HF_WEIGHTS:
            if (path / name).is_file():
                return Checkpoint(path, HF, [_read(path / name)])
        raise InputError(f"{path} has a config.json but none of {', '.join(_HF_WEIGHTS)}")
    raise InputError(f"{path} is a folder but neither a bnguard Loop checkpoint ({MANIFEST}) nor a Hugging Face "
                     "model folder (config.json): give the checkpoint folder itself or a weights file")


def _registered_objects(folder: Path) -> list[WeightsFile]:
    """What ``accelerator.register_for_checkpointing`` saved there that holds only tensors and plain containers
    (an AveragedModel registered beside the model, say); the loop's own objects are left alone."""
    found = []
    for path in sorted(folder.glob("custom_checkpoint_*.pkl")):
        try:
            found.append(_read(path))
        except InputError:
            continue
    return found


def _read(path: Path) -> WeightsFile:
    if path.stat().st_size == 0:
        raise InputError(f"{path} is an empty file (0 bytes): give the saved model's file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), "pt") as opened:
                metadata = opened.metadata()
            return WeightsFile(path, load_file(str(path)), metadata)
        except SafetensorError as error:
            raise InputError(f"{path} is not a readable safetensors file ({error})") from None
    try:
        return WeightsFile(path, torch.load(path, map_location="cpu", weights_only=True))
    except pickle.UnpicklingError as error:
        if not zipfile.is_zipfile(path):
            raise InputError(f"{path} is not a PyTorch or safetensors file (not written by torch.save)") from None
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = f" ({found.group(1)})" if found else ""
        raise InputError(f"{path} holds Python objects{what} besides tensors and plain containers, which bnguard "
                         "does not unpickle (that would run code from the file): save model.state_dict() instead") \
            from None
    except Exception as error:  # noqa: BLE001 - torch.load fails on other bytes in many ways, all of them bad input
        raise InputError(f"{path} is not a PyTorch or safetensors file ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else 'unreadable'}): give a file written by "
                         "torch.save or safetensors") from None


def recorded_accuracy(checkpoint: Checkpoint) -> float | None:
    """The eval accuracy the checkpoint's own records give for its weights and statistics: a Loop folder's
    last ``eval_acc`` (``records.json``), a Hugging Face Trainer folder's last ``eval_accuracy``
    (``trainer_state.json``); None where there is none."""
    records = []
    for name, key in ((RECORDS_COPY, "eval_acc"), ("trainer_state.json", "eval_accuracy")):
        path = checkpoint.path / name
        if checkpoint.path.is_dir() and path.is_file():
            try:
                found = json.loads(path.read_text())
            except ValueError:  # unreadable records judge nothing
                continue
            rows = found.get("log_history", []) if isinstance(found, dict) else found
            records += [row[key] for row in rows if isinstance(row, dict) and isinstance(row.get(key), float)]
    return records[-1] if records else None


def check_output(checkpoint: Checkpoint, out: Path, option: str = "--out", replaceable: bool = False) -> None:
    """Refuses an output that is the input, lies inside it, has no folder to go in, exists (unless
    ``replaceable``), or, for a checkpoint, would change the file's format."""
    source, target = checkpoint.path.resolve(), out.resolve()
    if target == source or source in target.parents:
        raise InputError(f"{option} {out} is the checkpoint itself or inside it: bnguard never overwrites its input; "
                         "give a new path")
    if not out.parent.is_dir():
        raise InputError(f"{option} {out}: folder {out.parent} does not exist")
    try:  # what would fail after all the work: a file made there (root passes any mode check, not a mount's)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as error:
        raise InputError(f"{option} {out}: folder {out.parent} cannot be written to ({error.strerror}); give a path "
                         "in a folder you can write") from None
    if replaceable:
        return
    if out.exists():
        raise InputError(f"{option} {out} exists: bnguard does not replace files; remove it or give a new path")
    if checkpoint.path.is_file() and out.suffix != checkpoint.path.suffix:
        raise InputError(f"{option} {out}: the checkpoint is written back in its own format, name it *"
                         f"{checkpoint.path.suffix}")


def write_checkpoint(checkpoint: Checkpoint, changed: list[WeightsFile], out: Path) -> None:
    """The checkpoint with ``changed`` files in place of their originals, at ``out``: built beside it under a
    temporary name and renamed into place once complete, so ``out`` is whole or absent."""
    partial = out.parent / f".{out.name}.partial"
    _remove(partial)  # left by an earlier interrupted write
    try:
        if checkpoint.path.is_dir():
            shutil.copytree(checkpoint.path, partial)
            for weights in changed:
                _save(weights, partial / weights.path.name)
            if checkpoint.kind == LOOP:
                write_manifest(partial)
        else:
            _save(changed[0], partial)
        os.replace(partial, out)
    finally:
        _remove(partial)


def _save(weights: WeightsFile, path: Path) -> None:
    """In the format of the file it was read from."""
    if weights.path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(weights.content, str(path), metadata=weights.metadata)
    else:
        torch.save(weights.content, path)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
