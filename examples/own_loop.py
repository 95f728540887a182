"""bnguard's hooks in a hand-written Accelerate loop (no bnguard.Loop): BNStatsLogger and AutoRecalibrate
fired by a HookRunner, logging to a W&B run (offline unless an API key is configured).

    accelerate launch examples/own_loop.py --epochs 3
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/own_loop.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader

import bnguard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import digits  # noqa: E402
from models import SeedNet  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit-batches", type=int, default=None, help="training batches per epoch")
    parser.add_argument("--tracker", choices=["wandb", "tensorboard", "all", "none"], default="wandb")
    parser.add_argument("--output-dir", help="where the tracker files go (default runs/<timestamp>)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    output_dir = bnguard.shared_output_dir(accelerator, args.output_dir)
    bnguard.start_trackers(accelerator, args.tracker, project="bnguard-own-loop", output_dir=output_dir)
    train_set, eval_set, channels, classes = digits(image_size=32)
    model = SeedNet(classes, width=16, in_channels=channels, bn_momentum=0.01)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    train_loader = DataLoader(train_set, batch_size=32, shuffle=True)
    eval_loader = DataLoader(eval_set, batch_size=128)
    # Recalibration batches: fresh shuffles of the training set, each process its own share.
    train_batches = bnguard.TrainingBatches(train_loader, accelerator=accelerator)
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

    runner = bnguard.HookRunner([bnguard.BNStatsLogger(every_n_steps=20), bnguard.AutoRecalibrate()],
                                accelerator=accelerator, model=model, optimizer=optimizer, evaluate=evaluate,
                                train_batches=train_batches)
    runner.fire(bnguard.Event.FIT_START)
    step = 0
    for epoch in range(args.epochs):
        runner.fire(bnguard.Event.EPOCH_START, epoch=epoch, record={})
        model.train()
        counts = torch.zeros(2, device=accelerator.device)  # correct, seen: train accuracy for the gap check
        for batch_index, (inputs, targets) in enumerate(train_loader):
            if args.limit_batches is not None and batch_index >= args.limit_batches:
                break
            outputs = model(inputs)
            loss = F.cross_entropy(outputs, targets)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            counts += torch.stack([(outputs.argmax(1) == targets).sum(), torch.tensor(targets.numel())]).to(counts)
            step += 1
            runner.fire(bnguard.Event.STEP_END, step=step)
        correct, seen = accelerator.reduce(counts, reduction="sum").tolist()
        runner.fire(bnguard.Event.TRAIN_EPOCH_END, train_metrics={"train_acc": correct / seen})
        runner.fire(bnguard.Event.EVAL_START)
        eval_metrics = evaluate()
        runner.state.log(eval_metrics)
        runner.fire(bnguard.Event.EVAL_END, eval_metrics=eval_metrics)
        runner.fire(bnguard.Event.EPOCH_END)
        if accelerator.is_main_process:
            record = runner.state.record
            print(f"epoch {epoch + 1}: train accuracy {correct / seen:.3f}, eval accuracy "
                  f"{runner.state.eval_metrics['eval_acc']:.3f}, recalibrated {record['recalibrated']}", flush=True)
    runner.fire(bnguard.Event.FIT_END)
    accelerator.end_training()
    return runner.state.eval_metrics


if __name__ == "__main__":
    main()
