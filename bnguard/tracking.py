"""Starting Accelerate's W&B and TensorBoard trackers, one at a time, so that one failing spares the rest."""

from __future__ import annotations

import netrc
import os
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

TRACKER_CHOICES = ("wandb", "tensorboard", "all", "none")


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
    accelerator: Any, names: list[str], project: str, output_dir: Path, config: dict[str, Any], run_name: str | None
) -> None:
    """Starts each named tracker on the main process and appends it to ``accelerator.trackers``.

    W&B runs offline when no API key is configured and WANDB_MODE is unset; the run's folder and the
    ``wandb sync`` command are printed. A tracker that fails to start is dropped with one warning.
    """
    if not accelerator.is_main_process:
        return
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    for name in names:
        try:
            if name == "wandb":
                kwargs: dict[str, Any] = {"dir": str(output_dir), "name": run_name}
                if "WANDB_MODE" not in os.environ and not wandb_has_api_key():
                    kwargs["mode"] = "offline"
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
        if name == "wandb" and tracker.run.settings.mode == "offline":
            run_dir = Path(tracker.run.dir).parent
            print(f"W&B run written offline to {run_dir}\n  upload it later with: wandb sync {run_dir}")


def wandb_run(accelerator: Any) -> Any:
    """The live W&B run on this process, or None."""
    for tracker in getattr(accelerator, "trackers", []):
        if tracker.name == "wandb":
            return tracker.run
    return None


def tensorboard_writer(accelerator: Any) -> Any:
    """The TensorBoard SummaryWriter on this process, or None."""
    for tracker in getattr(accelerator, "trackers", []):
        if tracker.name == "tensorboard":
            return tracker.writer
    return None
