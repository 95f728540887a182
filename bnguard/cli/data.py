"""The batches a repair runs on, from ``--data``: the training split for recalibration, the eval split to
judge it by, each process taking every world_size-th batch."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from . import datasets
from .errors import InputError
from .forms import IMAGENET
from .specs import call, load_object


@dataclass
class Data:
    """Fresh iterables of this process's training and eval batches on every call."""

    train: Callable[[], Iterable[Any]]
    evaluation: Callable[[], Iterable[Any]]
    description: str


def load_data(spec: str, options: Any, kwargs: dict[str, Any], rank: int, world_size: int) -> Data:
    """``options``: the command's image size, seed, normalization, batch size and workers for the data sets
    bnguard knows; ``kwargs`` for a factory."""
    source, _, rest = spec.partition(":")
    if spec == "digits":
        try:
            train, evaluation, _, _ = datasets.digits(options.image_size, seed=options.seed)
        except ImportError as error:
            raise InputError(f"--data digits: {error}") from None
    elif source == "imagefolder" and rest:
        try:
            normalize = datasets.IMAGENET_NORMALIZATION if options.normalize == IMAGENET else options.normalize
            train, evaluation, _, _ = datasets.image_folder(Path(rest), options.image_size, seed=options.seed,
                                                            normalization=normalize)
        except FileNotFoundError as error:
            raise InputError(f"--data {spec}: {error}") from None
    elif ":" not in spec and Path(spec).is_dir():
        raise InputError(f"--data {spec}: give a folder of images as --data imagefolder:{spec}")
    else:
        return _from_factory(spec, kwargs, rank, world_size)
    return Data(train=_loader(train, options, rank, world_size, shuffle=True),
                evaluation=_loader(evaluation, options, rank, world_size, shuffle=False),
                description=f"{spec} ({len(train)} training and {len(evaluation)} eval samples, seed {options.seed})")


def _loader(dataset: Dataset, options: Any, rank: int, world_size: int, shuffle: bool) -> Callable[[], DataLoader]:
    sampler = RankBatches(len(dataset), options.batch_size, rank, world_size, options.seed if shuffle else None)
    return lambda: DataLoader(dataset, batch_sampler=sampler, num_workers=options.workers)


class RankBatches(Sampler[list[int]]):
    """Batches of indices, shuffled by ``seed`` (None: in order), batch j to process j % world_size."""

    def __init__(self, size: int, batch_size: int, rank: int, world_size: int, seed: int | None):
        self.size, self.batch_size, self.rank, self.world_size, self.seed = size, batch_size, rank, world_size, seed

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.arange(self.size) if self.seed is None else \
            torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed))
        batches = [order[i:i + self.batch_size].tolist() for i in range(0, self.size, self.batch_size)]
        return iter(batches[self.rank::self.world_size])

    def __len__(self) -> int:
        batches = -(-self.size // self.batch_size)
        return len(range(self.rank, batches, self.world_size))


def _from_factory(spec: str, kwargs: dict[str, Any], rank: int, world_size: int) -> Data:
    """A factory returning (train, eval) loaders, or a mapping with "train" and "eval" (or "validation")."""
    made = call(load_object(spec, "--data"), kwargs, "--data")
    if isinstance(made, Mapping):
        evaluation = next((made[key] for key in ("eval", "validation", "val") if key in made), None)
        pair = (made.get("train"), evaluation)
    elif isinstance(made, (tuple, list)) and len(made) == 2:
        pair = tuple(made)
    else:
        pair = (None, None)
    if not all(isinstance(part, Iterable) for part in pair):
        raise InputError(f"--data {spec} must return (train_loader, eval_loader) or a dict with 'train' and 'eval' "
                         f"loaders, got {type(made).__name__}")
    train, evaluation = pair
    return Data(train=lambda: itertools.islice(train, rank, None, world_size),
                evaluation=lambda: itertools.islice(evaluation, rank, None, world_size),
                description=f"{spec}{_sizes(train, evaluation)}")


def _sizes(train: Any, evaluation: Any) -> str:
    try:
        return f" ({len(train)} training and {len(evaluation)} eval batches)"
    except TypeError:
        return ""
