"""Data sets for the examples: scikit-learn's digits by default (shipped inside its wheel: no download), and
an image folder as bnguard's command line reads them (bnguard.cli.datasets), or CIFAR-10."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from bnguard.cli import datasets as bnguard_datasets
from bnguard.cli.datasets import digits

__all__ = ["cifar10", "digits", "image_folder"]


def _existing_dir(data_dir: str | None, what: str) -> Path:
    if not data_dir:
        raise ValueError(f"--dataset {what} needs --data-dir pointing at the data")
    path = Path(data_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"--data-dir {path} does not exist: give the folder that holds the {what} data")
    return path


def cifar10(data_dir: str | None, image_size: int = 32) -> tuple[Dataset, Dataset, int, int]:
    """CIFAR-10 from ``data_dir`` (downloaded there when online)."""
    from torchvision import datasets, transforms

    path = _existing_dir(data_dir, "cifar10")
    normalize = transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    train_tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                   transforms.Resize(image_size), transforms.ToTensor(), normalize])
    eval_tf = transforms.Compose([transforms.Resize(image_size), transforms.ToTensor(), normalize])
    try:
        train = datasets.CIFAR10(str(path), train=True, download=True, transform=train_tf)
    except (OSError, RuntimeError) as error:  # offline: a URLError, an OSError
        raise FileNotFoundError(
            f"CIFAR-10 is not in --data-dir {path} and could not be downloaded ({error}): put "
            "cifar-10-python.tar.gz (from https://www.cs.toronto.edu/~kriz/cifar.html), or the "
            f"cifar-10-batches-py folder it holds, in {path} and run again") from None
    test = datasets.CIFAR10(str(path), train=False, download=True, transform=eval_tf)
    return train, test, 3, 10


def image_folder(data_dir: str | None, image_size: int = 64, seed: int = 0,
                 eval_fraction: float = 0.2) -> tuple[Dataset, Dataset, int, int]:
    """A class-per-folder image tree (such as the 176-class leaf set), split reproducibly by ``seed``."""
    return bnguard_datasets.image_folder(_existing_dir(data_dir, "imagefolder"), image_size, seed, eval_fraction)
