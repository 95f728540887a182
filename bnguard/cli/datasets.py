"""The data sets the example trains on, and the command line repairs with: the same splits in both."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

IMAGENET_NORMALIZATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def digits(image_size: int = 32, seed: int = 0, eval_fraction: float = 0.25) -> tuple[Dataset, Dataset, int, int]:
    """UCI handwritten digits (1,797 8x8 images, 10 classes, shipped inside scikit-learn's wheel), split
    reproducibly by ``seed``, upsampled to ``image_size`` and standardized with the training split's mean and
    standard deviation. Returns (train, eval, channels, classes)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the digits data set comes with scikit-learn: pip install scikit-learn") from None

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


def image_folder(data_dir: str | Path, image_size: int = 64, seed: int = 0, eval_fraction: float = 0.2,
                 normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
                 ) -> tuple[Dataset, Dataset, int, int]:
    """A class-per-folder image tree, split reproducibly by ``seed``: the training split with random resized
    crops and flips, the eval split resized; ``normalization`` = (means, stds) per channel, or none."""
    from torchvision import datasets, transforms

    path = Path(data_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist: give the folder that holds one folder of images per class")
    normalize = [transforms.Normalize(*normalization)] if normalization else []
    train_tf = transforms.Compose([transforms.RandomResizedCrop(image_size, scale=(0.6, 1.0)),
                                   transforms.RandomHorizontalFlip(), transforms.ToTensor(), *normalize])
    eval_tf = transforms.Compose([transforms.Resize((image_size, image_size)), transforms.ToTensor(), *normalize])
    try:
        train_view = datasets.ImageFolder(str(path), transform=train_tf)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{path} holds no class folders with images: {error}") from None
    eval_view = datasets.ImageFolder(str(path), transform=eval_tf)
    order = torch.randperm(len(train_view), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = int(len(order) * (1 - eval_fraction))
    return Subset(train_view, order[:cut]), Subset(eval_view, order[cut:]), 3, len(train_view.classes)
