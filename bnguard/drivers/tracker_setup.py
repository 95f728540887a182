"""Starting and finishing Accelerate's trackers for a run: W&B (offline without a key), TensorBoard, MLflow
(where MLFLOW_TRACKING_URI points) and Aim (a repository in the output folder); a resumed run continues the
W&B, MLflow and Aim runs it started."""

from __future__ import annotations

import importlib
import netrc
import os
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

TRACKERS = ("wandb", "tensorboard", "mlflow", "aim")
TRACKER_CHOICES = (*TRACKERS, "all", "none")  # "all": W&B and TensorBoard, which need no setup
# In the output folder: the id of the tracker's run that a resumed run continues.
RUN_ID_FILES = {"wandb": "wandb-run-id", "mlflow": "mlflow-run-id", "aim": "aim-run-hash"}
EXTRAS = {"mlflow": "mlflow", "aim": "aim"}  # trackers whose package comes with an extra of bnguard's


def tracker_names(tracker: str | list[str] | None) -> list[str]:
    """``"wandb"``, ``"tensorboard"``, ``"mlflow"``, ``"aim"``, ``"all"``, ``"none"``/None, or a list of
    names, as a list of names; a tracker whose package is missing is an error that names the extra."""
    if tracker is None or tracker == "none":
        return []
    if tracker == "all":
        return ["wandb", "tensorboard"]
    names = [tracker] if isinstance(tracker, str) else list(tracker)
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise ValueError(f"unknown tracker {unknown[0]!r}: choose from {', '.join(TRACKER_CHOICES)}")
    for name in names:
        if name in EXTRAS and not _importable(name):
            raise ImportError(f"tracker {name!r} needs the {name} package, which is not installed: "
                              f"pip install 'bnguard[{EXTRAS[name]}]'")
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
    """Starts each tracker (``"wandb"``, ``"tensorboard"``, ``"mlflow"``, ``"aim"``, ``"all"``, ``"none"``
    or a list) on the main process and appends it to ``accelerator.trackers``; ``accelerator.end_training()``
    finishes them.

    W&B runs offline when no API key is configured and WANDB_MODE is unset; the run's folder and the
    ``wandb sync`` command are printed. MLflow logs where MLflow's own settings say (MLFLOW_TRACKING_URI;
    without it, MLflow's default local store), in the experiment ``project``; Aim to a repository in
    ``output_dir``. Each run's id is kept in ``output_dir`` (:data:`RUN_ID_FILES`), and a ``resuming`` run
    continues those runs instead of opening others. A tracker that fails to start is dropped with one warning.
    """
    names, output_dir, config = tracker_names(tracker), Path(output_dir), dict(config or {})
    if not accelerator.is_main_process:
        return
    for name in names:
        if name == "tensorboard" and not _importable("tensorboard", "tensorboardX"):
            warnings.warn("tracker 'tensorboard' is left out: the tensorboard package is not installed; "
                          "pip install tensorboard (or bnguard's examples extra) and run again", stacklevel=3)
            continue
        run_id = _kept_id(output_dir, name) if resuming else None
        try:
            tracker = _tracker(name, project, output_dir, run_name, run_id)
            tracker.start()
            if name == "tensorboard":  # its hparams take only scalars and strings
                config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
            if not (name == "mlflow" and run_id):  # an MLflow run's parameters are set once
                tracker.store_init_configuration(config)
        except Exception as error:  # noqa: BLE001 - any failure to start only costs that tracker
            warnings.warn(f"tracker {name!r} could not start and is left out: {error!r}", stacklevel=3)
            continue
        accelerator.trackers.append(tracker)
        if name in RUN_ID_FILES:
            _keep_id(output_dir, name, _run_id(name, tracker))
        _say_where(name, tracker, output_dir)


def _tracker(name: str, project: str, output_dir: Path, run_name: str | None, run_id: str | None) -> Any:
    from accelerate.tracking import AimTracker, MLflowTracker, TensorBoardTracker, WandBTracker

    if name == "wandb":
        kwargs: dict[str, Any] = {"dir": str(output_dir), "name": run_name}
        if "WANDB_MODE" not in os.environ and not wandb_has_api_key():
            kwargs["mode"] = "offline"
        if run_id:
            kwargs.update(id=run_id, resume="allow")
        return WandBTracker(project, **kwargs)
    if name == "mlflow":
        return MLflowTracker(experiment_name=project, run_id=run_id, run_name=run_name)
    if name == "aim":
        output_dir.mkdir(parents=True, exist_ok=True)
        return AimTracker(run_name or project, str(output_dir), experiment=project, run_hash=run_id)
    return TensorBoardTracker(run_name or project, str(output_dir / "tensorboard"))


def _run_id(name: str, tracker: Any) -> str:
    if name == "mlflow":
        return tracker.active_run.info.run_id
    return tracker.run.id if name == "wandb" else tracker.writer.hash


def _kept_id(output_dir: Path, name: str) -> str | None:
    """The run id a tracker of this name kept in ``output_dir``, if any."""
    if name not in RUN_ID_FILES:
        return None
    path = output_dir / RUN_ID_FILES[name]
    return path.read_text().strip() if path.is_file() else None


def _keep_id(output_dir: Path, name: str, run_id: str) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    partial = output_dir / f"{RUN_ID_FILES[name]}.partial"
    partial.write_text(run_id)
    partial.replace(output_dir / RUN_ID_FILES[name])


def _say_where(name: str, tracker: Any, output_dir: Path) -> None:
    if name == "wandb" and tracker.run.settings.mode == "offline":
        run_dir = Path(tracker.run.dir).parent
        print(f"W&B run written offline to {run_dir}\n  upload it later with: wandb sync {run_dir}")
    elif name == "mlflow":
        import mlflow

        print(f"MLflow run {_run_id(name, tracker)} in {mlflow.get_tracking_uri()}")
    elif name == "aim":
        print(f"Aim run {_run_id(name, tracker)} in {output_dir}\n  view it with: aim up --repo {output_dir}")


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
    """Finishes every tracker this process started (files flushed, runs closed)."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()
