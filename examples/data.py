"""Data sets for the examples: scikit-learn's digits by default (shipped inside its wheel: no download)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset


def digits(image_size: int = 32, seed: int = 0, eval_fraction: float = 0.25) -> tuple[Dataset, Dataset, int, int]:
    """UCI handwritten digits (1,797 8x8 images, 10 classes), split reproducibly by ``seed``, upsampled to
    ``image_size`` and standardized. Returns (train, eval, channels, classes)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(len(labels) * (1 - eval_fraction))
    train_idx, eval_idx = order[:cut], order[cut:]
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    return TensorDataset(images[train_idx], labels[train_idx]), TensorDataset(images[eval_idx], labels[eval_idx]), 1, 10


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
    from torch.utils.data import Subset
    from torchvision import datasets, transforms

    path = _existing_dir(data_dir, "imagefolder")
    train_tf = transforms.Compose([transforms.RandomResizedCrop(image_size, scale=(0.6, 1.0)),
                                   transforms.RandomHorizontalFlip(), transforms.ToTensor()])
    eval_tf = transforms.Compose([transforms.Resize((image_size, image_size)), transforms.ToTensor()])
    try:
        train_view = datasets.ImageFolder(str(path), transform=train_tf)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"--data-dir {path} holds no class folders with images: {error}") from None
    eval_view = datasets.ImageFolder(str(path), transform=eval_tf)
    order = torch.randperm(len(train_view), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = int(len(order) * (1 - eval_fraction))
    return Subset(train_view, order[:cut]), Subset(eval_view, order[cut:]), 3, len(train_view.classes)
