"""Where a run's outputs go: one folder, agreed on by every process."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from accelerate.utils import broadcast_object_list


def shared_output_dir(accelerator: Any, output_dir: str | Path | None = None) -> Path:
    """``output_dir``, or ``runs/<timestamp>`` with the main process's timestamp on every process (their
    clocks can straddle a second)."""
    if output_dir is None:
        chosen = [f"runs/{time.strftime('%Y%m%d-%H%M%S')}"]
        if accelerator.num_processes > 1:
            broadcast_object_list(chosen)
        output_dir = chosen[0]
    return Path(output_dir)
