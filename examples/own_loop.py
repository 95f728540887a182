"""bnguard's hooks in a hand-written Accelerate loop (no bnguard.Loop): fire the events yourself.

    accelerate launch examples/own_loop.py --epochs 3
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


class PrintEval(bnguard.Hook):
    def on_eval_end(self, state):
        if state.is_main_process:
            print(f"epoch {state.epoch + 1}: eval accuracy {state.eval_metrics['eval_acc']:.3f}")


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit-batches", type=int, default=None, help="training batches per epoch")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    accelerator = Accelerator()
    train_set, eval_set, channels, classes = digits(image_size=32)
    model = SeedNet(classes, width=16, in_channels=channels)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    train_loader = DataLoader(train_set, batch_size=32, shuffle=True)
    eval_loader = DataLoader(eval_set, batch_size=128)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)

    def evaluate() -> dict[str, float]:
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for inputs, targets in eval_loader:
                predictions, targets = accelerator.gather_for_metrics((model(inputs).argmax(1), targets))
                correct += (predictions == targets).sum().item()
                total += targets.numel()
        model.train()
        return {"eval_acc": correct / total}

    runner = bnguard.HookRunner([PrintEval()], accelerator=accelerator, model=model, optimizer=optimizer,
                                evaluate=evaluate, train_batches=lambda: train_loader)
    runner.fire(bnguard.Event.FIT_START)
    step = 0
    for epoch in range(args.epochs):
        runner.fire(bnguard.Event.EPOCH_START, epoch=epoch)
        model.train()
        for batch_index, (inputs, targets) in enumerate(train_loader):
            if args.limit_batches is not None and batch_index >= args.limit_batches:
                break
            loss = F.cross_entropy(model(inputs), targets)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            runner.fire(bnguard.Event.STEP_END, step=step)
        runner.fire(bnguard.Event.TRAIN_EPOCH_END)
        runner.fire(bnguard.Event.EVAL_START)
        runner.fire(bnguard.Event.EVAL_END, eval_metrics=evaluate())
        runner.fire(bnguard.Event.EPOCH_END)
    runner.fire(bnguard.Event.FIT_END)
    return runner.state.eval_metrics


if __name__ == "__main__":
    main()
