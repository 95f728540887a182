"""Checkpoints written whole or not at all, through Accelerate's save_state / load_state."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from .validation import positive_int

_NAME = re.compile(r"^epoch-(\d+)$")


class Checkpoints:
    """The loop's checkpoint schedule: ``directory/epoch-NNNN`` (NNNN: epochs done) every ``every_epochs``
    epochs and at the end of training; never when ``every_epochs`` is None."""

    def __init__(self, accelerator: Any, directory: Path, every_epochs: int | None):
        self.accelerator, self.directory = accelerator, directory
        self.every_epochs = positive_int("checkpoint_every_epochs", every_epochs, optional=True)

    def after_epoch(self, epochs_done: int) -> None:
        if self.every_epochs and epochs_done % self.every_epochs == 0:
            save_checkpoint(self.accelerator, self.directory, epochs_done)

    def at_end(self, epochs_done: int) -> None:
        """The final state, unless the last epoch already saved it."""
        if self.every_epochs and epochs_done % self.every_epochs:
            save_checkpoint(self.accelerator, self.directory, epochs_done)


def save_checkpoint(accelerator: Any, directory: Path, epoch: int) -> Path:
    """Saves to ``directory/epoch-NNNN`` via a temporary folder renamed into place once complete."""
    final = directory / f"epoch-{epoch:04d}"
    partial = directory / f".epoch-{epoch:04d}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # left by an earlier interrupted save
        directory.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        stale = directory / f".epoch-{epoch:04d}.replaced"
        if final.exists():
            final.rename(stale)
        partial.rename(final)
        shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    """The complete checkpoint with the highest epoch under ``directory``, if any."""
    found = [(int(m.group(1)), p) for p in directory.glob("epoch-*") if (m := _NAME.match(p.name)) and p.is_dir()]
    return max(found)[1] if found else None


def resolve_checkpoint(resume_from: str | Path, output_dir: Path) -> Path:
    """``"latest"`` (newest under ``output_dir/checkpoints``), or a checkpoint folder, checked to exist."""
    if str(resume_from) == "latest":
        found = latest_checkpoint(output_dir / "checkpoints")
        if found is None:
            raise FileNotFoundError(f"resume_from='latest' but {output_dir / 'checkpoints'} holds no checkpoint")
        return found
    path = Path(resume_from)
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from={str(resume_from)!r} is not a checkpoint folder")
    return path
