"""What the command-line tests hand to ``bnguard``: data factories (given as tests/_support/cli_setup.py:NAME) and a
way to run the command as a user would, in its own process."""

import copy
import json
import subprocess
import sys
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bnguard
from helpers import ROOT, buffers_of, parameters_of, support_env, toy_data

TOY_DATA = ("--data", "tests/_support/cli_setup.py:loaders", "--tolerance", "off")
TINY_RESNET = ("--model", "tests/_support/helpers.py:tiny_resnet")

def loaders(size: int = 8, n_train: int = 48, n_eval: int = 24, batch_size: int = 8, offset: float = 0.0,
            train_shift: float = 0.0, train_scale: float = 1.0, channels: int = 1, random_labels: bool = False):
    """(train, eval) loaders of toy images plus ``offset``; the training order fixed by its own generator, so
    a second call gives the same batches. ``train_scale`` / ``train_shift`` make training inputs unlike the
    eval ones; ``channels`` copies of the one channel; ``random_labels``: eval labels unrelated to the images
    (data unlike any the model was trained on)."""
    images, labels = toy_data(n_train, size=size).tensors
    train = TensorDataset(((images + offset) * train_scale + train_shift).repeat(1, channels, 1, 1), labels)
    shuffled = DataLoader(train, batch_size=batch_size, shuffle=n_train > 0, generator=torch.Generator().manual_seed(0))
    images, labels = toy_data(n_eval, seed=1, size=size).tensors
    if random_labels:
        labels = torch.randint(0, 4, labels.shape, generator=torch.Generator().manual_seed(7))
    return shuffled, DataLoader(TensorDataset((images + offset).repeat(1, channels, 1, 1), labels),
                                batch_size=batch_size)


def dict_loaders(n_train: int = 32, n_eval: int = 16, batch_size: int = 8):
    """A dict of loaders of Hugging Face style batches (pixel_values, labels)."""
    from hf_setup import ImageDicts

    train = DataLoader(ImageDicts(n_train), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    return {"train": train, "eval": DataLoader(ImageDicts(n_eval, seed=1), batch_size=batch_size)}


def no_batchnorm():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 4))


@dataclass
class Widths:
    """A model file's own dataclass: loading the file must register it as a module, as an import would."""

    channels: int = 4


def lazy_net(channels: int = 4):
    """Lazy layers, whose shapes come from the checkpoint."""
    widths = Widths(channels)
    return nn.Sequential(nn.LazyConv2d(widths.channels, 3), nn.LazyBatchNorm2d(), nn.Flatten(), nn.LazyLinear(4))


def run_bnguard(*args, cwd=ROOT, launcher=(sys.executable, "-m", "bnguard")):
    """The command line in a new process, from the repository root; returns the finished process."""
    env = support_env(OMP_NUM_THREADS="1")
    return subprocess.run([*launcher, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def trained(model: nn.Module, epochs: int = 6, lr: float = 0.05, size: int = 8, seed: int = 0,
            offset: float = 0.0) -> nn.Module:
    """A few epochs of SGD on the toy training set, BatchNorm statistics tracked by momentum as usual."""
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    train, _ = loaders(size=size, offset=offset)
    model.train()
    for _ in range(epochs):
        for images, labels in train:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
    return model


def recalibrated(model, batches, device="cpu"):
    """What the command should have written: the library's recalibration on ``device``, on one thread like
    the command."""
    model, threads = copy.deepcopy(model).to(device), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bnguard.recalibrate(model, batches, progress=False)
    finally:
        torch.set_num_threads(threads)
    return {name: value.cpu() for name, value in buffers_of(model).items()}


def assert_repaired(loaded, original, batches, device="cpu"):
    """Parameters bit-identical to the original's, statistics those of the library on ``device``: the same
    bits on the CPU; on CUDA within float32 rounding, the command's convolutions being free to pick other
    algorithms than a test under deterministic ones."""
    expected = recalibrated(original, batches, device)
    assert buffers_of(loaded).keys() == expected.keys()
    for name, value in expected.items():
        if device == "cpu":
            assert torch.equal(buffers_of(loaded)[name], value), name
        else:
            torch.testing.assert_close(buffers_of(loaded)[name], value, rtol=1e-5, atol=1e-6, msg=name)
    for name, value in parameters_of(original).items():
        assert torch.equal(parameters_of(loaded)[name], value), name


def report_of(out):
    return json.loads(out.with_name(out.name + ".report.json").read_text())
