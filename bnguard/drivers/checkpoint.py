"""Checkpoints written whole or not at all, through Accelerate's save_state / load_state."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..utils.manifest import RECORDS_COPY, CheckpointError, verify_checkpoint, write_manifest
from ..utils.validation import positive_int

_NAME = re.compile(r"^epoch-(\d+)$")


class Checkpoints:
    """The loop's checkpoint schedule: ``directory/epoch-NNNN`` (NNNN: epochs done) every ``every_epochs``
    epochs and at the end of training; never when ``every_epochs`` is None."""

    def __init__(self, accelerator: Any, model: torch.nn.Module, directory: Path, every_epochs: int | None,
                 records: Callable[[], list[dict[str, Any]]] = list):
        self.accelerator, self.model, self.directory, self.records = accelerator, model, directory, records
        self.every_epochs = positive_int("checkpoint_every_epochs", every_epochs, optional=True)

    def after_epoch(self, epochs_done: int) -> None:
        if self.every_epochs and epochs_done % self.every_epochs == 0:
            self._save(epochs_done)

    def at_end(self, epochs_done: int) -> None:
        """The final state, unless the last epoch already saved it."""
        if self.every_epochs and epochs_done % self.every_epochs:
            self._save(epochs_done)

    def _save(self, epochs_done: int) -> None:
        finite = torch.stack([p.detach().isfinite().all() for p in self.model.parameters()]).tolist()
        if not all(finite):  # one synchronization per checkpoint
            name = [n for (n, _), ok in zip(self.model.named_parameters(), finite) if not ok][0]
            raise FloatingPointError(f"parameter {name} holds NaN/Inf: checkpoint epoch-{epochs_done:04d} not "
                                     "written, the latest checkpoint is the last good one")
        save_checkpoint(self.accelerator, self.directory, epochs_done, self.records())


def save_checkpoint(accelerator: Any, directory: Path, epoch: int, records: list[dict[str, Any]] | None = None) -> Path:
    """Saves to ``directory/epoch-NNNN`` via a temporary folder renamed into place once complete, with a copy
    of the run's ``records`` (:data:`RECORDS_COPY`) when given."""
    final = directory / f"epoch-{epoch:04d}"
    partial = directory / f".epoch-{epoch:04d}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # left by an earlier interrupted save
        directory.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if records is not None:
            (partial / RECORDS_COPY).write_text(json.dumps(records, allow_nan=False))
        write_manifest(partial)
        stale = directory / f".epoch-{epoch:04d}.replaced"
        if final.exists():
            final.rename(stale)
        partial.rename(final)
        shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def checkpoints_newest_first(directory: Path) -> list[Path]:
    """The checkpoint folders under ``directory``, highest epoch first."""
    found = [(int(m.group(1)), p) for p in directory.glob("epoch-*") if (m := _NAME.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found, reverse=True)]


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoint under ``directory`` that verifies; each newer one that does not is named in a
    warning."""
    for path in checkpoints_newest_first(directory):
        try:
            verify_checkpoint(path)
        except CheckpointError as error:
            warnings.warn(f"{error}; falling back to an older checkpoint", stacklevel=4)  # at the fit() call
            continue
        return path
    return None


def resolve_checkpoint(resume_from: str | Path, output_dir: Path, missing_ok: bool = False) -> Path | None:
    """``"latest"`` (the newest that verifies under ``output_dir/checkpoints``; None when there is no
    checkpoint at all and ``missing_ok``), or a checkpoint folder, verified against its manifest."""
    if str(resume_from) == "latest":
        directory = output_dir / "checkpoints"
        if not checkpoints_newest_first(directory):
            if missing_ok:
                return None
            raise FileNotFoundError(f"resume_from='latest' but {directory} holds no checkpoint; pass "
                                    "missing_ok=True to start fresh when there is none")
        found = latest_checkpoint(directory)
        if found is None:
            raise FileNotFoundError(f"resume_from='latest' but {directory} holds no checkpoint that verifies")
        return found
    path = Path(resume_from)
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from={str(resume_from)!r} is not a checkpoint folder")
    verify_checkpoint(path)
    return path


def records_copy(folder: Path) -> list[dict[str, Any]] | None:
    """The records a (verified) checkpoint folder holds a copy of; None for a checkpoint written without."""
    path = folder / RECORDS_COPY
    return json.loads(path.read_text()) if path.is_file() else None
