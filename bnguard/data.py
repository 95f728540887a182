"""Drawing extra training batches (for recalibration) without disturbing the training run."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Restores the torch (CPU and CUDA), Python and NumPy global random states on exit."""
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def side_batches(loader: DataLoader, *, seed: int, rank: int, world_size: int) -> Iterator[Any]:
    """This process's share of a fresh shuffle of ``loader``'s dataset, batched like ``loader``.

    The shuffle comes from its own generator seeded with ``seed`` and no global random state is left
    changed, so the training loader's order and the run's random stream are exactly as without it. A short
    last batch is dropped when there is a full one: BatchNorm cannot train-normalize a batch of one, and a
    handful of samples normalized among themselves would not be representative anyway.
    """
    if isinstance(loader.dataset, IterableDataset):
        raise TypeError("drawing recalibration batches needs a map-style training dataset (with __getitem__)")
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(loader.dataset), generator=generator)[rank::world_size].tolist()
    side = DataLoader(
        loader.dataset,
        batch_size=loader.batch_size or 1,
        sampler=indices,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        generator=generator,
        drop_last=len(indices) >= (loader.batch_size or 1),
    )
    with preserved_rng():
        yield from side
