"""The hooks' state in a Hugging Face checkpoint folder: tied to the checkpoint it was written with, and found
again when the Trainer resumes, whatever happened to it in between."""

from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "bnguard_hooks.pt"
TRAINER_STATE = "trainer_state.json"  # the Trainer's own file in every checkpoint folder
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def trainer_state_digest(folder: Path) -> str | None:
    """SHA-256 of the checkpoint's ``trainer_state.json``, which the Trainer writes before bnguard's file:
    the fingerprint that ties the two together."""
    path = folder / TRAINER_STATE
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def hook_state_for(folder: Path, step: int, is_main_process: bool = True) -> dict[str, Any] | None:
    """The hook state saved with the checkpoint ``folder`` the Trainer resumes at ``step``. When that file is
    missing, damaged or belongs to another checkpoint, the newest earlier checkpoint's beside it, with a
    warning naming what is lost; with none, None (the hooks start afresh, said too). Never an error: the
    Trainer resumes either way, as it would without bnguard."""
    saved, problem = _checked(folder, step)
    if problem is None:
        return saved
    say = (lambda text: warnings.warn(text, stacklevel=4)) if is_main_process else (lambda text: None)
    for earlier_step, earlier in _earlier_checkpoints(folder.parent, step):
        saved, earlier_problem = _checked(earlier, earlier_step)
        if earlier_problem is None:
            say(f"{folder / STATE_FILE} {problem}: bnguard's hooks continue from {earlier / STATE_FILE} (step "
                f"{earlier_step}); their records and decisions from step {earlier_step} to {step} are lost")
            return saved
    say(f"{folder / STATE_FILE} {problem}, and no earlier checkpoint beside it holds bnguard's hook state: the hooks "
        f"start afresh at step {step} (their records and decisions before it are lost)")
    return None


def _checked(folder: Path, step: int) -> tuple[dict[str, Any] | None, str | None]:
    """The saved state and None, or None and what is wrong with it."""
    path = folder / STATE_FILE
    if not path.is_file():
        return None, "is missing (the run stopped after the Trainer wrote its checkpoint, before bnguard wrote this)"
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure to read means the same: unusable
        return None, f"is damaged and cannot be read ({type(error).__name__}: {str(error)[:100]})"
    if not isinstance(saved, dict) or "hooks" not in saved:
        return None, "is not bnguard's hook state"
    if "step" not in saved:
        warnings.warn(f"{path} was written by an older bnguard, which did not tie it to its checkpoint: loaded "
                      "unchecked", stacklevel=4)
        return saved, None
    if saved["step"] != step:
        return None, f"was written at step {saved['step']}, not at step {step} where the Trainer resumes"
    if saved["trainer_state_sha256"] != trainer_state_digest(folder):
        return None, f"belongs to another checkpoint (the {TRAINER_STATE} it was written with differs)"
    return saved, None


def _earlier_checkpoints(parent: Path, step: int) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), path) for path in parent.glob("checkpoint-*")
             if (m := _CHECKPOINT.match(path.name)) and path.is_dir() and int(m.group(1)) < step]
    return sorted(found, reverse=True)
