"""A tiny real Lightning setup for the adapter's tests: the seed's network (examples/models.py, narrow) in a
LightningModule that logs train_* on every step and val_* per epoch, as most LightningModules do."""


import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import toy_data
from models import SeedNet


class Classifier(pl.LightningModule):
    def __init__(self, lr: float = 0.05, bn_momentum: float | None = 0.1, width: int = 4):
        super().__init__()
        self.net, self.lr = SeedNet(4, width=width, in_channels=1), lr
        for module in self.net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = bn_momentum

    def forward(self, images):
        return self.net(images)

    def _step(self, batch, prefix: str):
        images, labels = batch
        logits = self(images)
        loss = nn.functional.cross_entropy(logits, labels)
        acc = (logits.argmax(1) == labels).float().mean()
        return loss, acc

    def training_step(self, batch, batch_idx):
        loss, acc = self._step(batch, "train")
        self.log_dict({"train_loss": loss, "train_acc": acc})
        return loss

    def validation_step(self, batch, batch_idx):
        loss, acc = self._step(batch, "val")
        self.log_dict({"val_loss": loss, "val_acc": acc}, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def loaders(n_train: int = 32, n_eval: int = 12, batch_size: int = 8, shuffle: bool = True):
    train = DataLoader(toy_data(n_train, size=16), batch_size=batch_size, shuffle=shuffle)
    return train, DataLoader(toy_data(n_eval, seed=1, size=16), batch_size=batch_size)


def memorizing_loaders():
    """16 training samples with random labels, memorized; an eval set of its own random labels."""
    g = torch.Generator().manual_seed(5)
    train = TensorDataset(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g))
    evaluation = TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g))
    return DataLoader(train, batch_size=16), DataLoader(evaluation, batch_size=64)


def trainer(tmp_path, callbacks, epochs: int = 3, **kwargs):
    kwargs.setdefault("logger", False)
    kwargs.setdefault("devices", 1)
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", callbacks=callbacks, default_root_dir=tmp_path,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      deterministic=True, **kwargs)
