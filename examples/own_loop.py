"""bnguard in a hand-written Accelerate loop (no bnguard.Loop): a bnguard.Guard with BNStatsLogger and
AutoRecalibrate, three calls in the loop, logging to a W&B run (offline unless an API key is configured). The
checkpoint Accelerate writes each epoch (save_state) holds the guard's state too, and --resume continues from
it as if never interrupted.

    accelerate launch examples/own_loop.py --epochs 3
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/own_loop.py
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch.utils.data import DataLoader

import bnguard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import digits  # noqa: E402
from models import SeedNet  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit-batches", type=int, default=None, help="training batches per epoch")
    parser.add_argument("--tracker", choices=["wandb", "tensorboard", "mlflow", "aim", "all", "none"],
                        default="wandb")
    parser.add_argument("--output-dir", help="where the tracker files go (default runs/<timestamp>)")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    accelerator = Accelerator(cpu=not torch.cuda.is_available(),  # shuffles that a resumed run draws again
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    output_dir = bnguard.shared_output_dir(accelerator, args.output_dir)
    bnguard.start_trackers(accelerator, args.tracker, project="bnguard-own-loop", output_dir=output_dir)
    train_set, eval_set, channels, classes = digits(image_size=32)
    model = SeedNet(classes, width=16, in_channels=channels, bn_momentum=0.01)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    train_loader = DataLoader(train_set, batch_size=32, shuffle=True)
    eval_loader = DataLoader(eval_set, batch_size=128)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)

    def evaluate() -> dict[str, float]:
        """Eval-mode accuracy, every sample counted once over all processes."""
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for inputs, targets in eval_loader:
                predictions, targets = accelerator.gather_for_metrics((model(inputs).argmax(1), targets))
                correct += (predictions == targets).sum().item()
                total += targets.numel()
        model.train()
        return {"eval_acc": correct / total}

    guard = bnguard.Guard(model, [bnguard.BNStatsLogger(every_n_steps=20), bnguard.AutoRecalibrate()],
                          evaluate=evaluate, train_loader=train_loader, accelerator=accelerator)
    accelerator.register_for_checkpointing(guard)
    checkpoint = Path(output_dir) / "checkpoint"
    if args.resume:
        accelerator.load_state(str(checkpoint))
    for epoch in range(len(guard.records), args.epochs):
        model.train()
        train_loader.set_epoch(epoch)
        for batch_index, (inputs, targets) in enumerate(train_loader):
            if args.limit_batches is not None and batch_index >= args.limit_batches:
                break
            outputs = model(inputs)
            loss = F.cross_entropy(outputs, targets)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            guard.step(outputs, targets, loss=loss)  # counts train loss and accuracy
        metrics = guard.evaluated(evaluate())  # the recalibrated accuracy when bnguard recalibrated
        if accelerator.is_main_process:
            record = guard.records[-1]
            print(f"epoch {epoch + 1}: train accuracy {record['train_acc']:.3f}, eval accuracy "
                  f"{metrics['eval_acc']:.3f}, recalibrated {record['recalibrated']}", flush=True)
        accelerator.save_state(str(checkpoint.with_suffix(".partial")))  # every process writes its part
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:  # then the finished folder replaces the last one
            if checkpoint.exists():
                checkpoint.rename(checkpoint.with_suffix(".old"))
            checkpoint.with_suffix(".partial").rename(checkpoint)
            shutil.rmtree(checkpoint.with_suffix(".old"), ignore_errors=True)
    guard.end()
    accelerator.end_training()
    return guard.state.eval_metrics


if __name__ == "__main__":
    main()
