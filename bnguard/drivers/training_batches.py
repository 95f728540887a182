"""Extra training batches drawn for the hooks (recalibration, probes) without disturbing the training run."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset

from ..recalibration.isolation import preserved_rng
from ..utils.distributed import process_info


def loader_batch_size(loader: DataLoader) -> int:
    """The samples in each of ``loader``'s batches on this process, in every form of loader: its own
    ``batch_size``; else, when a batch sampler batches it (given as ``batch_sampler=``, or put there by
    ``accelerator.prepare``, which leaves ``batch_size`` None), that sampler's, divided among the processes
    when Accelerate splits batches."""
    if loader.batch_size is not None:
        return loader.batch_size
    sampler = loader.sampler if isinstance(loader.sampler, BatchSampler) else loader.batch_sampler
    shares = 1
    while sampler is not None:
        if getattr(sampler, "split_batches", False):  # Accelerate: each process takes a slice of each batch
            shares *= getattr(sampler, "num_processes", 1)
        size = getattr(sampler, "batch_size", None)
        if isinstance(size, int) and size > 0:
            return max(1, size // shares)
        sampler = getattr(sampler, "batch_sampler", None)  # a wrapper (Accelerate's shard or skip sampler)
    raise TypeError(
        f"cannot tell the batch size of {type(loader).__name__}: its batch sampler "
        f"({type(loader.batch_sampler).__name__}) has no batch_size; give it one, or pass recalibration_loader= "
        "(batches prepared as for training) for bnguard to recalibrate on")


def side_batches(loader: DataLoader, *, size: int, seed: int, rank: int, world_size: int) -> Iterator[Any]:
    """This process's share of a fresh shuffle of ``loader``'s dataset, in batches of ``size`` (as
    :func:`loader_batch_size` finds ``loader``'s) collated like ``loader``'s.

    The shuffle comes from its own generator seeded with ``seed`` and no global random state is left
    changed, so the training loader's order and the run's random stream are exactly as without it. A short
    last batch is dropped when there is a full one: BatchNorm cannot train-normalize a batch of one, and a
    handful of samples normalized among themselves would not be representative anyway.
    """
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(loader.dataset), generator=generator)[rank::world_size].tolist()
    side = DataLoader(
        loader.dataset,
        batch_size=size,
        sampler=indices,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        generator=generator,
        drop_last=len(indices) >= size,
    )
    with preserved_rng():
        yield from side


def indexable(loader: Any) -> bool:
    """Whether ``loader`` is a DataLoader over a map-style dataset, which can be reshuffled."""
    return hasattr(loader, "dataset") and not isinstance(loader.dataset, IterableDataset)


class TrainingBatches:
    """Training batches for hooks to recalibrate on, in any loop: each call is a new shuffle of ``loader``'s
    dataset, batched like it, this process's share of it. Every sample is drawn at most once per call over
    all processes, no collective runs, and no global random state changes, so drawing leaves the training run
    exactly as it was. Register it for checkpointing (``accelerator.register_for_checkpointing``) and a
    resumed run draws the same samples as an uninterrupted one.

    Args:
        loader: the training loader, before or after ``accelerator.prepare``: only its dataset, batch size
            (:func:`loader_batch_size`: a prepared loader's is its batch sampler's), collate function and
            workers are used, never its iterator.
        accelerator: gives this process's rank and the world size (default: the process group's).
        seed: seeds the shuffles.
    """

    def __init__(self, loader: DataLoader, *, accelerator: Any = None, seed: int = 0):
        if indexable(loader) and not isinstance(loader, DataLoader):
            raise TypeError(
                f"TrainingBatches batches loader's dataset as loader does (batch size, collate function, "
                f"workers), so it needs a torch DataLoader; got {type(loader).__name__}, which prepares batches "
                "its own way (timm's PrefetchLoader normalizes them on the device): pass recalibration_loader= "
                "(any iterable of batches prepared as for training) instead")
        if not indexable(loader):
            raise TypeError("TrainingBatches needs a DataLoader over a map-style dataset (with __getitem__)")
        self.loader, self.seed, self.batch_size = loader, seed, loader_batch_size(loader)
        self.rank, self.world_size = process_info(accelerator)
        self.draws = 0

    def __call__(self) -> Iterator[Any]:
        self.draws += 1
        return side_batches(self.loader, size=self.batch_size, seed=self.seed * 1_000_003 + self.draws,
                            rank=self.rank, world_size=self.world_size)

    def state_dict(self) -> dict[str, int]:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.draws = state["draws"]


class LoaderBatches:
    """Training batches for hooks from a loader of their own (``recalibration_loader``): each call iterates
    it afresh, as given. Any iterable works, streams included; one shorter than a recalibration budget is
    simply used whole. On several processes each iterates its own copy: give each its own share."""

    def __init__(self, loader: Iterable[Any]):
        self.loader = loader

    def __call__(self) -> Iterator[Any]:
        return iter(self.loader)

    def state_dict(self) -> dict[str, int]:
        return {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        return None


def hook_batches(train_loader: Any, recalibration_loader: Iterable[Any] | None, *, accelerator: Any,
                 seed: int) -> TrainingBatches | LoaderBatches | None:
    """What a loop offers its hooks: ``recalibration_loader`` when given, else fresh shuffles of the training
    set when it can be indexed, else nothing (a stream: hooks that need batches then say so)."""
    if recalibration_loader is not None:
        return LoaderBatches(recalibration_loader)
    if not indexable(train_loader):
        return None
    return TrainingBatches(train_loader, accelerator=accelerator, seed=seed)
