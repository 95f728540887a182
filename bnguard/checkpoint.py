"""Checkpoints written whole or not at all, through Accelerate's save_state / load_state."""

from __future__ import annotations

import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

_NAME = re.compile(r"^epoch-(\d+)$")


@dataclass
class Progress:
    """Where the loop is: epochs completed, optimizer steps taken, batches drawn for recalibration."""

    epoch: int = 0
    step: int = 0
    draws: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


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
