"""The checkpoint folder's own files, as the Loop writes them and the command line reads them: the manifest
that proves a folder complete and unchanged, and the copy of the run's records."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

MANIFEST = "bnguard-manifest.json"
RECORDS_COPY = "records.json"  # in each checkpoint folder: the records of the epochs it holds


class CheckpointError(ValueError):
    """A checkpoint folder that is incomplete or whose files changed since it was written."""


def write_manifest(folder: Path) -> None:
    """Records the size and SHA-256 of every file in ``folder``, in a manifest written last and atomically."""
    files = {str(path.relative_to(folder)): _fingerprint(path) for path in sorted(folder.rglob("*"))
             if path.is_file() and path.name != MANIFEST}
    partial = folder / f".{MANIFEST}.partial"
    partial.write_text(json.dumps({"format": 1, "files": files}, indent=1))
    partial.replace(folder / MANIFEST)


def verify_checkpoint(folder: Path) -> None:
    """Raises :class:`CheckpointError` naming the folder and the file when the checkpoint is incomplete or a
    file differs from what its manifest recorded."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {MANIFEST}: it is incomplete, or was not written by "
                              "bnguard")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"checkpoint {folder}: {MANIFEST} is unreadable ({error!r})") from error
    for name, recorded in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder}: {name} is missing")
        actual = _fingerprint(path)
        if actual["size"] != recorded["size"]:
            raise CheckpointError(f"checkpoint {folder}: {name} has {actual['size']} bytes, {recorded['size']} "
                                  "were written (truncated or overwritten)")
        if actual["sha256"] != recorded["sha256"]:
            raise CheckpointError(f"checkpoint {folder}: {name} changed since it was written (checksum differs)")


def _fingerprint(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with path.open("rb") as data:
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}
