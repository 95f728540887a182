"""A tiny real Hugging Face setup for the adapter's tests: transformers' ResNetForImageClassification from a
tiny ResNetConfig (it has BatchNorm and takes pixel_values / labels), on dict batches."""

import numpy as np
import torch
import transformers
from torch import nn
from torch.utils.data import Dataset


class ImageDicts(Dataset):
    """Images whose class shifts their mean, as dicts with pixel_values and labels."""

    def __init__(self, n: int, seed: int = 0, classes: int = 4, random_labels: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, classes, (n,), generator=g)
        shift = torch.zeros(n) if random_labels else self.labels.float()
        self.images = torch.randn(n, 3, 16, 16, generator=g) + shift[:, None, None, None]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"pixel_values": self.images[index], "labels": self.labels[index]}


def tiny_resnet(bn_momentum: float | None = 0.1, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       num_labels=4)
    model = transformers.ResNetForImageClassification(config)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = bn_momentum
    return model


def accuracy(prediction):
    return {"accuracy": float((np.argmax(prediction.predictions, axis=1) == prediction.label_ids).mean())}


def training_args(tmp_path, epochs: int = 3, report_to="none", **kwargs):
    settings = dict(output_dir=str(tmp_path), num_train_epochs=epochs, per_device_train_batch_size=8,
                    per_device_eval_batch_size=8, learning_rate=0.05, eval_strategy="epoch",
                    logging_strategy="epoch", save_strategy="no", report_to=report_to, disable_tqdm=True,
                    use_cpu=True, seed=0, dataloader_num_workers=0)
    settings.update(kwargs)
    return transformers.TrainingArguments(**settings)


def trainer(tmp_path, callbacks, model=None, train=None, evaluation=None, compute_metrics=accuracy, **kwargs):
    return transformers.Trainer(model=model or tiny_resnet(), args=training_args(tmp_path, **kwargs),
                                train_dataset=train or ImageDicts(32),
                                eval_dataset=evaluation or ImageDicts(16, seed=1),
                                compute_metrics=compute_metrics, callbacks=callbacks)
