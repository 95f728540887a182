"""What bnguard's hooks cost on realistic epochs: the share of training time they take.

Epochs of CIFAR-10 size (390 batches of 128 synthetic 32x32 images, 10 classes; 10,000 eval images) in a
hand-written Accelerate loop with one evaluation at the end of each, run bare and with a bnguard.Guard holding
each set of hooks, from the same initial weights. A hook's cost in an epoch is the time spent inside the
Guard's calls less the one evaluation the loop runs anyway (so a recalibration, an evaluation run again after
it and the histograms count; the loop's own evaluation does not); its share is that cost over the rest of the
epoch. "The hooks alone" takes the Guard's own share (its counting of train loss and accuracy at every step,
the "Guard, no hooks" row) out of it. The first epoch holds the one-time work (PreciseBN's check of its first
recalibration, the layer table of BNStatsLogger); the later epochs show what every epoch of a long run costs.
The runs alternate in order between repeats, and the table gives medians.

- "Guard, no hooks": counting train loss and accuracy, firing events.
- "PreciseBN": recalibrates before every evaluation, at the hooks' default tolerance (the example's
  ``--bnguard always``); its first recalibration is checked once by evaluating before and after it.
- "AutoRecalibrate, always triggered": made to find a gap at every evaluation (``gap_threshold=-inf``): it
  recalibrates at the default tolerance, probes and evaluates again; where that did not close the gap (as on
  these data) it backs off for the next evaluations, so its later epochs cost what a quiet one does.
- "BNStatsLogger": per-layer histograms every 100 steps and after each evaluation, written to TensorBoard.

    python benchmarks/hook_share.py [--model seednet|resnet18] [--epochs 2] [--batches 390] [--batch-size 128]
        [--eval-samples 10000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch.utils.data import DataLoader, TensorDataset

import bnguard

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from models import SeedNet  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loop_overhead import described, train_epoch  # noqa: E402
from stopwatch import Stopwatch  # noqa: E402

MODELS = {"seednet": lambda: SeedNet(10, width=16), "resnet18": lambda: torchvision.models.resnet18(num_classes=10)}
HOOKS = {
    "bare loop": None,
    "Guard, no hooks": lambda: [],
    "PreciseBN": lambda: [bnguard.PreciseBN()],
    "AutoRecalibrate, always triggered": lambda: [bnguard.AutoRecalibrate(gap_threshold=-math.inf)],
    "BNStatsLogger": lambda: [bnguard.BNStatsLogger()],
}


def synthetic(samples: int, seed: int) -> TensorDataset:
    """Images whose class shifts their mean, so that the network learns and the accuracies move."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (samples,), generator=generator)
    images = torch.randn(samples, 3, 32, 32, generator=generator) * 0.5 + labels.float()[:, None, None, None] / 5
    return TensorDataset(images, labels)


def epochs_of(model_name: str, train_set, eval_set, batch_size: int, epochs: int, hooks) -> list[tuple[float, float]]:
    """Epochs, each with its evaluation; returns each epoch's seconds and the hooks' seconds in it (0 without
    a guard)."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.manual_seed(0)
    model = MODELS[model_name]()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with tempfile.TemporaryDirectory() as logs:
        accelerator = Accelerator(log_with="tensorboard", project_dir=logs)
        accelerator.init_trackers("hook-share")
        loader = DataLoader(train_set, batch_size=batch_size, shuffle=True)
        eval_loader = DataLoader(eval_set, batch_size=256)
        model, optimizer, loader, eval_loader = accelerator.prepare(model, optimizer, loader, eval_loader)
        evaluations: list[float] = []  # this epoch's evaluations' seconds

        def evaluate():
            start = time.perf_counter()
            model.eval()
            with torch.no_grad():
                hits = torch.cat([accelerator.gather_for_metrics(model(x).argmax(1) == y) for x, y in eval_loader])
            model.train()
            evaluations.append(time.perf_counter() - start)
            return {"acc": hits.double().mean().item()}

        guard = None if hooks is None else bnguard.Guard(model, hooks(), evaluate=evaluate, train_loader=loader,
                                                         accelerator=accelerator)
        inside = Stopwatch(guard, ["step", "evaluate", "end"]) if guard is not None else None
        seen = []
        for epoch in range(epochs):
            start, evaluations, before = time.perf_counter(), [], inside.seconds if inside is not None else 0.0
            train_epoch(accelerator, model, optimizer, loader, guard)
            if guard is None:
                evaluate()
            else:
                guard.evaluate()
                if epoch == epochs - 1:
                    guard.end()
            if accelerator.device.type == "cuda":
                torch.cuda.synchronize()
            hooks_seconds = inside.seconds - before - evaluations[0] if inside is not None else 0.0
            seen.append((time.perf_counter() - start, hooks_seconds))
        accelerator.end_training()
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="seednet")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batches", type=int, default=390)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--eval-samples", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    train_set = synthetic(args.batches * args.batch_size, seed=0)
    eval_set = synthetic(args.eval_samples, seed=1)
    seconds: dict[str, list[float]] = {name: [] for name in HOOKS}  # an epoch's, every epoch of every repeat
    first: dict[str, list[float]] = {name: [] for name in HOOKS}  # the hooks' share of the first epoch
    later: dict[str, list[float]] = {name: [] for name in HOOKS}  # and of each later one
    for repeat in range(args.repeats):
        for name in HOOKS if repeat % 2 == 0 else reversed(HOOKS):  # noise hits every run alike
            for epoch, (total, hooks) in enumerate(
                    epochs_of(args.model, train_set, eval_set, args.batch_size, args.epochs, HOOKS[name])):
                seconds[name].append(total)
                (first if epoch == 0 else later)[name].append(hooks / (total - hooks))
    bare = statistics.median(seconds["bare loop"])
    print(f"{args.epochs} epochs of {args.batches} batches of {args.batch_size} (32x32, 10 classes), each with one "
          f"evaluation of {args.eval_samples} images, {args.model}, on {described(Accelerator().device)}, median "
          f"of {args.repeats}, torch {torch.__version__}")
    print(f"| {'hooks':<34} | {'s / epoch':>9} | {'ratio to bare':>13} | {'share, 1st epoch':>16} | "
          f"{'share, later epochs':>19} | {'the hooks alone, later':>22} |")
    print(f"|{'-' * 36}|{'-' * 11}|{'-' * 15}|{'-' * 18}|{'-' * 21}|{'-' * 24}|")
    guard_alone = statistics.median(later["Guard, no hooks"]) if later["Guard, no hooks"] else math.nan
    for name in HOOKS:
        median = statistics.median(seconds[name])
        shares = ["-" if name == "bare loop" or not values else f"{100 * statistics.median(values):.2f}%"
                  for values in (first[name], later[name])]
        alone = ("-" if name in ("bare loop", "Guard, no hooks") or not later[name] else
                 f"{100 * (statistics.median(later[name]) - guard_alone):.2f}%")  # less the Guard's own counting
        print(f"| {name:<34} | {median:>9.2f} | {median / bare:>13.3f} | {shares[0]:>16} | {shares[1]:>19} | "
              f"{alone:>22} |")


if __name__ == "__main__":
    main()
