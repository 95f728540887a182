"""A Hugging Face Trainer with bnguard's hooks in one callback: transformers' ResNet on the digits.

    python examples/hf_trainer.py                                   # offline, about a minute on 2 CPU cores
    python examples/hf_trainer.py --bnguard off                     # the Trainer alone, for comparison
    torchrun --nproc_per_node 2 examples/hf_trainer.py --cpu        # 2 CPU processes (gloo)

The Trainer keeps the best checkpoint by eval_loss (metric_for_best_model): with bnguard, the recalibrated
eval_loss. Leaves in --output-dir: the checkpoints (each with bnguard's hook state), and the W&B run (offline
by default; the `wandb sync` command is printed).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from torch import nn
from torch.utils.data import Dataset

import bnguard
from bnguard.integrations.transformers import BNGuardCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import digits  # noqa: E402


class AsDicts(Dataset):
    """(image, label) pairs as the dicts a transformers model takes."""

    def __init__(self, pairs: Dataset):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, label = self.pairs[index]
        return {"pixel_values": image, "labels": label}


def accuracy(prediction: transformers.EvalPrediction) -> dict[str, float]:
    return {"accuracy": float((np.argmax(prediction.predictions, axis=1) == prediction.label_ids).mean())}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bnguard", choices=["auto", "off", "always"], default="auto",
                   help="auto: BNStatsLogger + AutoRecalibrate on eval_loss (default); off: no callback; "
                        "always: BNStatsLogger + PreciseBN")
    p.add_argument("--epochs", type=int, default=12, help="training epochs (default 12)")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size per process (default 32)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default 2e-3)")
    p.add_argument("--bn-momentum", type=float, default=0.01, help="BatchNorm momentum (default 0.01)")
    p.add_argument("--seed", type=int, default=2, help="seed for the split, the weights and the data order")
    p.add_argument("--wandb", choices=["offline", "online", "off"], default="offline",
                   help="W&B run mode (default offline: no account needed)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU where there is a GPU too")
    p.add_argument("--output-dir", default="runs/hf", help="where outputs go (default runs/hf)")
    return p.parse_args(argv)


def build_model(classes: int, bn_momentum: float, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[16, 32, 64],
                                       depths=[1, 1, 1], num_labels=classes)
    model = transformers.ResNetForImageClassification(config)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = bn_momentum
    return model


def main(argv: list[str] | None = None) -> transformers.Trainer:
    args = parse_args(argv)
    if args.wandb != "off":
        os.environ.setdefault("WANDB_MODE", args.wandb)
        os.environ.setdefault("WANDB_DIR", args.output_dir)
        os.environ.setdefault("WANDB_PROJECT", "bnguard-hf")
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    train_set, eval_set, _, classes = digits(32, seed=args.seed)
    callbacks = [] if args.bnguard == "off" else [BNGuardCallback([
        bnguard.BNStatsLogger(every_n_steps=50, overview_metric="loss"),
        bnguard.PreciseBN() if args.bnguard == "always" else bnguard.AutoRecalibrate(monitor="loss",
                                                                                    higher_is_better=False),
    ])]
    settings = transformers.TrainingArguments(
        output_dir=args.output_dir, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=256, learning_rate=args.lr, lr_scheduler_type="constant", seed=args.seed,
        eval_strategy="epoch", logging_strategy="epoch", save_strategy="epoch", save_total_limit=2,
        load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=False, use_cpu=args.cpu,
        report_to="wandb" if args.wandb != "off" else "none", disable_tqdm=True)
    trainer = transformers.Trainer(model=build_model(classes, args.bn_momentum, args.seed), args=settings,
                                   train_dataset=AsDicts(train_set), eval_dataset=AsDicts(eval_set),
                                   compute_metrics=accuracy, callbacks=callbacks)
    trainer.train()
    if trainer.is_world_process_zero():
        print(f"[{args.bnguard}] best eval_loss {trainer.state.best_metric:.4f} in "
              f"{trainer.state.best_model_checkpoint}")
        if callbacks:
            records = callbacks[0].records
            fixed = sum(bool(r.get("recalibrated")) for r in records)
            print(f"[{args.bnguard}] final eval_accuracy {records[-1]['eval_accuracy']:.4f}, {fixed} recalibration(s)")
        if args.wandb != "off":
            import wandb

            print(f"W&B run in {Path(wandb.run.dir).parent}")
            wandb.finish()
    return trainer


if __name__ == "__main__":
    main()
