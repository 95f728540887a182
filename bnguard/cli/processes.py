"""One process, or every process ``torchrun`` started, and the device each one runs on."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import InputError


@dataclass(frozen=True)
class Processes:
    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wait_for_everyone(self) -> None:
        if self.world_size > 1:
            dist.barrier()


@contextmanager
def processes(requested_device: str | None) -> Iterator[Processes]:
    """Joins the process group ``torchrun`` describes (gloo on the CPU, NCCL on GPUs), left at the end."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = _device(requested_device, int(os.environ.get("LOCAL_RANK", "0")) if world_size > 1 else None)
    joined = world_size > 1 and not dist.is_initialized()
    if joined:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Processes(dist.get_rank() if world_size > 1 else 0, world_size, device)
    finally:
        if joined:
            dist.destroy_process_group()


def _device(requested: str | None, local_rank: int | None) -> torch.device:
    try:
        device = torch.device(requested or default_device())
    except RuntimeError as error:
        raise InputError(f"--device {requested!r} is not a device ({error}): give cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {requested} but torch sees no GPU here: give --device cpu")
    if device.type == "cuda" and device.index is None and local_rank is not None:
        device = torch.device("cuda", local_rank)  # one GPU per process under torchrun
    return device


def default_device() -> str:
    """cuda when there is a GPU, unless Accelerate's ACCELERATE_USE_CPU asks for the CPU (as ``accelerate
    launch --cpu`` and a test suite that means CPU do)."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "t", "true", "y", "yes", "on"):
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"
