"""Starting and finishing Accelerate's trackers for a run: W&B (offline without a key, resumed by id) and
TensorBoard."""

from __future__ import annotations

import importlib
import netrc
import os
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

TRACKER_CHOICES = ("wandb", "tensorboard", "all", "none")
WANDB_RUN_ID = "wandb-run-id"  # in the output folder: the W&B run a resumed run continues


def tracker_names(tracker: str | list[str] | None) -> list[str]:
    """``"wandb"``, ``"tensorboard"``, ``"all"``, ``"none"``/None, or a list of names, as a list of names."""
    if tracker is None or tracker == "none":
        return []
    if tracker == "all":
        return ["wandb", "tensorboard"]
    names = [tracker] if isinstance(tracker, str) else list(tracker)
    unknown = [name for name in names if name not in ("wandb", "tensorboard")]
    if unknown:
        raise ValueError(f"unknown tracker {unknown[0]!r}: choose from {', '.join(TRACKER_CHOICES)}")
    return names


def wandb_has_api_key() -> bool:
    """True when W&B would find a key: WANDB_API_KEY, or a netrc entry for its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return bool(netrc.netrc().authenticators(host or "api.wandb.ai"))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def start_trackers(
    accelerator: Any, tracker: str | list[str] | None, *, project: str, output_dir: str | Path,
    config: dict[str, Any] | None = None, run_name: str | None = None, resuming: bool = False,
) -> None:
    """Starts each tracker (``"wandb"``, ``"tensorboard"``, ``"all"``, ``"none"`` or a list) on the main
    process and appends it to ``accelerator.trackers``; ``accelerator.end_training()`` finishes them.

    W&B runs offline when no API key is configured and WANDB_MODE is unset; the run's folder and the
    ``wandb sync`` command are printed. Its run id is kept in ``output_dir`` (:data:`WANDB_RUN_ID`), and a
    ``resuming`` run continues that W&B run instead of opening another. A tracker that fails to start is
    dropped with one warning.
    """
    names, output_dir, config = tracker_names(tracker), Path(output_dir), dict(config or {})
    if not accelerator.is_main_process:
        return
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    for name in names:
        if name == "tensorboard" and not _importable("tensorboard", "tensorboardX"):
            warnings.warn("tracker 'tensorboard' is left out: the tensorboard package is not installed; "
                          "pip install tensorboard (or bnguard's examples extra) and run again", stacklevel=3)
            continue
        try:
            if name == "wandb":
                kwargs: dict[str, Any] = {"dir": str(output_dir), "name": run_name}
                if "WANDB_MODE" not in os.environ and not wandb_has_api_key():
                    kwargs["mode"] = "offline"
                if resuming and (output_dir / WANDB_RUN_ID).is_file():
                    kwargs.update(id=(output_dir / WANDB_RUN_ID).read_text().strip(), resume="allow")
                tracker = WandBTracker(project, **kwargs)
            else:
                tracker = TensorBoardTracker(run_name or project, str(output_dir / "tensorboard"))
            tracker.start()
            if name == "tensorboard":  # its hparams take only scalars and strings
                config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
            tracker.store_init_configuration(config)
        except Exception as error:  # noqa: BLE001 - any failure to start only costs that tracker
            warnings.warn(f"tracker {name!r} could not start and is left out: {error!r}", stacklevel=3)
            continue
        accelerator.trackers.append(tracker)
        if name == "wandb":
            output_dir.mkdir(parents=True, exist_ok=True)
            partial = output_dir / f"{WANDB_RUN_ID}.partial"
            partial.write_text(tracker.run.id)
            partial.replace(output_dir / WANDB_RUN_ID)
        if name == "wandb" and tracker.run.settings.mode == "offline":
            run_dir = Path(tracker.run.dir).parent
            print(f"W&B run written offline to {run_dir}\n  upload it later with: wandb sync {run_dir}")


def _importable(*packages: str) -> bool:
    """Whether any of ``packages`` imports."""
    for package in packages:
        try:
            importlib.import_module(package)
        except ImportError:
            continue
        return True
    return False


def finish(accelerator: Any) -> None:
    """Finishes every tracker this process started (files flushed, W&B run closed)."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()
