"""Reads an offline W&B run back from its `.wandb` file, the way the tests check what a run holds.

The file is a LevelDB-style log: a 7-byte header starting with ':W&B', then 32 KiB blocks of chunks, each
with a 7-byte header (CRC32, little-endian uint16 length, type: 1 full, 2 first, 3 middle, 4 last); a block
tail shorter than a header is padding. Joined chunks are `Record` protobuf messages.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
HEADER = 7


class IncompleteLog(Exception):
    """The log ends in a chunk that is not (yet) whole."""


def records(path: Path) -> list[pb.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B log"
    out, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:
            pos += left_in_block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        payload = data[pos + HEADER : pos + HEADER + length]
        if kind == 0 and length == 0:
            break
        if zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF != checksum:
            raise IncompleteLog(f"{path}: chunk at byte {pos} does not match its checksum (still being written?)")
        pos += HEADER + length
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def finished_records(run_dir: Path, timeout: float = 30.0) -> list[pb.Record]:
    """The run's records once its `exit` record is written: W&B's service may still be writing the file
    for a moment after `run.finish()` returns."""
    (log,) = Path(run_dir).glob("*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = records(log)
        except IncompleteLog:
            if time.monotonic() > deadline:
                raise
        else:
            if any(r.WhichOneof("record_type") == "exit" for r in found) or time.monotonic() > deadline:
                return found
        time.sleep(0.05)


def history(run_dir: Path) -> list[dict]:
    """The run's history, one row per step in step order: {'_step': ..., 'key' or 'a/b': value}.

    W&B may write one step in several records; they are merged, as W&B merges several logs at one step.
    """
    rows: dict[int, dict] = {}
    for record in finished_records(run_dir):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = "/".join(item.nested_key) if item.nested_key else item.key
            row[key] = json.loads(item.value_json)
        rows.setdefault(row["_step"], {}).update(row)
    return [rows[step] for step in sorted(rows)]


def config(run_dir: Path) -> dict:
    values = {}
    for record in finished_records(run_dir):
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                key = "/".join(item.nested_key) if item.nested_key else item.key
                values[key] = json.loads(item.value_json)
    return values


def offline_run_dir(output_dir: Path, timeout: float = 30.0) -> Path:
    """The one offline run under output_dir, once its log file exists (the service creates it)."""
    deadline = time.monotonic() + timeout
    while not (found := list(Path(output_dir).glob("wandb/offline-run-*/*.wandb"))) and time.monotonic() < deadline:
        time.sleep(0.05)
    (log,) = found
    return log.parent
