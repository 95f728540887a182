"""The little of torch.distributed that bnguard needs, usable with or without Accelerate."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def process_info(accelerator: Any = None) -> tuple[int, int]:
    """(rank, world size), from an ``accelerate.Accelerator`` if given, else the default process group."""
    if accelerator is not None:
        return accelerator.process_index, accelerator.num_processes
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather(tensor: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    """Every process's copy of a same-shaped tensor, in rank order (moved where the backend needs it)."""
    if world_size == 1:
        return [tensor]
    local = tensor.to(_backend_device())
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local)
    return [part.to(tensor.device) for part in gathered]


def sum_over_processes(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """The element-wise sum of a same-shaped tensor over every process."""
    if world_size == 1:
        return tensor
    local = tensor.to(_backend_device(), copy=True)
    dist.all_reduce(local)
    return local.to(tensor.device)


def _backend_device() -> torch.device:
    """Where the process group's backend takes tensors: the current GPU for NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def split_budget(total: int | None, rank: int, world_size: int) -> int | None:
    """This process's share of a global budget, the remainder going to the lowest ranks."""
    if total is None:
        return None
    return total // world_size + (1 if rank < total % world_size else 0)
