"""The question's network in PyTorch Lightning, with bnguard's hooks in one callback.

    python examples/lightning_train.py                 # digits, offline, about 1 minute on 2 CPU cores
    python examples/lightning_train.py --compare       # without and with bnguard, same seed, one plot
    python examples/lightning_train.py --accelerator cpu --devices 2   # DDP on 2 CPU processes

ModelCheckpoint keeps the best epoch by val_acc: with bnguard, the recalibrated val_acc. Leaves in
--output-dir: accuracy.png, the checkpoints, and the W&B run (offline by default; the `wandb sync` command is
printed).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from torch import nn
from torch.utils.data import DataLoader

import bnguard
from bnguard.integrations.lightning import BNGuardCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import digits  # noqa: E402
from models import SeedNet  # noqa: E402
from plot import plot_accuracy  # noqa: E402


class DigitsClassifier(pl.LightningModule):
    """SeedNet with the usual Lightning logging: train_* on every step, val_* per epoch."""

    def __init__(self, channels: int, classes: int, width: int, bn_momentum: float, lr: float):
        super().__init__()
        self.net, self.lr = SeedNet(classes, width=width, in_channels=channels, bn_momentum=bn_momentum), lr

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def _measure(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        logits = self(images)
        return nn.functional.cross_entropy(logits, labels), (logits.argmax(1) == labels).float().mean()

    def training_step(self, batch, batch_idx):
        loss, acc = self._measure(batch)
        self.log_dict({"train_loss": loss, "train_acc": acc})
        return loss

    def validation_step(self, batch, batch_idx):
        loss, acc = self._measure(batch)
        self.log_dict({"val_loss": loss, "val_acc": acc}, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bnguard", choices=["auto", "off", "always", "monitor"], default="auto",
                   help="auto: BNStatsLogger + AutoRecalibrate (default); off: no hooks; always: BNStatsLogger + "
                        "PreciseBN; monitor: AutoRecalibrate(report_only=True)")
    p.add_argument("--compare", action="store_true", help="run 'off' and 'auto' with the same seed, plot both")
    p.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size per process (default 32)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default 2e-3)")
    p.add_argument("--bn-momentum", type=float, default=0.01, help="BatchNorm momentum (default 0.01)")
    p.add_argument("--width", type=int, default=16, help="SeedNet's first-stage width (default 16)")
    p.add_argument("--seed", type=int, default=2, help="seed for the split, the weights and the data order")
    p.add_argument("--accelerator", choices=["auto", "cpu", "gpu"], default="auto",
                   help="Lightning's accelerator (default auto: a GPU where there is one)")
    p.add_argument("--devices", type=int, default=1,
                   help="processes, one per device; more than 1 runs DDP, which Lightning starts (default 1)")
    p.add_argument("--wandb", choices=["offline", "online", "off"], default="offline",
                   help="W&B run mode (default offline: no account needed)")
    p.add_argument("--output-dir", default="runs/lightning", help="where outputs go (default runs/lightning)")
    return p.parse_args(argv)


def hooks_for(mode: str) -> list[bnguard.Hook]:
    if mode == "off":
        return []
    repair = {"auto": bnguard.AutoRecalibrate(), "always": bnguard.PreciseBN(),
              "monitor": bnguard.AutoRecalibrate(report_only=True)}[mode]
    return [bnguard.BNStatsLogger(every_n_steps=50), repair]


def train(args, mode: str, data, output_dir: Path) -> tuple[list[dict], float, bool]:
    train_set, eval_set, channels, classes = data
    pl.seed_everything(args.seed, verbose=False)
    model = DigitsClassifier(channels, classes, args.width, args.bn_momentum, args.lr)
    guard = BNGuardCallback(hooks_for(mode))
    best = ModelCheckpoint(dirpath=output_dir / "checkpoints", monitor="val_acc", mode="max")
    logger = WandbLogger(project="bnguard-lightning", name=f"{output_dir.name}-{mode}", save_dir=str(output_dir),
                         offline=args.wandb == "offline") if args.wandb != "off" else False
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator=args.accelerator, devices=args.devices,
                         strategy="ddp" if args.devices > 1 else "auto", callbacks=[guard, best], logger=logger,
                         default_root_dir=output_dir, num_sanity_val_steps=0, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=10)
    started = time.perf_counter()
    trainer.fit(model, DataLoader(train_set, batch_size=args.batch_size, shuffle=True),
                DataLoader(eval_set, batch_size=256))
    if logger and trainer.is_global_zero:
        print(f"[{mode}] W&B run in {Path(logger.experiment.dir).parent}")
        logger.experiment.finish()
    if trainer.is_global_zero:
        print(f"[{mode}] best val_acc {float(best.best_model_score):.4f} in {best.best_model_path}")
    if trainer.is_global_zero and mode != "off" and guard.hooks[0].save_staleness(output_dir.parent / "staleness.png"):
        print(f"how far each recalibration moved each layer: {output_dir.parent / 'staleness.png'}")
    return guard.records, time.perf_counter() - started, trainer.is_global_zero


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    args = parse_args(argv)
    data, output_dir = digits(32, seed=args.seed), Path(args.output_dir)
    results, main_process = {}, True
    for mode in ["off", "auto"] if args.compare else [args.bnguard]:
        records, seconds, main_process = train(args, mode, data, output_dir / mode)
        results[mode] = records
        if main_process and records:
            fixed = sum(bool(r.get("recalibrated")) for r in records)
            print(f"[{mode}] final val_acc {records[-1]['eval_acc']:.4f}, {fixed} recalibration(s), {seconds:.1f} s")
    if main_process and all(results.values()):
        path = plot_accuracy(results, output_dir / "accuracy.png", title=f"SeedNet on digits in Lightning, seed "
                             f"{args.seed}, Adam lr {args.lr}, BN momentum {args.bn_momentum}")
        print(f"plot in {path}")
    return results


if __name__ == "__main__":
    main()
