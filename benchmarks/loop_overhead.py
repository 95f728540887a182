"""Cost of bnguard.Guard in a hand-written Accelerate loop, and of bnguard.Loop (no trackers), against the
bare hand-written loop.

Every run trains the example's network (SeedNet, width 16) on digits at 32x32 with Adam, batch 32, from the
same initial weights, and evaluates after every epoch; the order of the runs alternates between repeats so
that machine noise hits all alike. "Guard, no hooks" is the guard's own cost (counting train loss and
accuracy, firing events); "default hooks" adds BNStatsLogger and AutoRecalibrate. Whole-run ratios move by
several percent between runs on a shared machine, so the table also gives the share of each run spent
inside the Guard's calls, timed directly (median over repeats). Prints one table.

    python benchmarks/loop_overhead.py [--epochs 3] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from torch.utils.data import DataLoader

import bnguard

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from data import digits  # noqa: E402
from models import SeedNet  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stopwatch import Stopwatch  # noqa: E402


def setup(train_set):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.manual_seed(0)
    model = SeedNet(10, width=16, in_channels=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    return model, optimizer, DataLoader(train_set, batch_size=32, shuffle=True)


def hand_written(train_set, eval_set, epochs: int, guard_hooks=None) -> tuple[float, float]:
    """A minimal Accelerate loop that evaluates every epoch; with ``guard_hooks`` (a list), the same loop
    with a bnguard.Guard's three calls. Returns the run's seconds and those spent inside the guard."""
    model, optimizer, loader = setup(train_set)
    accelerator = Accelerator()
    eval_loader = DataLoader(eval_set, batch_size=128)
    model, optimizer, loader, eval_loader = accelerator.prepare(model, optimizer, loader, eval_loader)

    def evaluate():
        model.eval()
        with torch.no_grad():
            hits = torch.cat([accelerator.gather_for_metrics(model(x).argmax(1) == y) for x, y in eval_loader])
        return {"eval_acc": hits.double().mean().item()}

    guard = None if guard_hooks is None else bnguard.Guard(model, guard_hooks, evaluate=evaluate,
                                                             train_loader=loader, accelerator=accelerator)
    inside = Stopwatch(guard, ["step", "evaluated", "end"]) if guard is not None else None
    start = time.perf_counter()
    for _ in range(epochs):
        train_epoch(accelerator, model, optimizer, loader, guard)
        metrics = evaluate()
        if guard is not None:
            metrics = guard.evaluated(metrics)
    if guard is not None:
        guard.end()
    return time.perf_counter() - start, inside.seconds if inside is not None else float("nan")


def train_epoch(accelerator: Accelerator, model, optimizer, loader, guard: bnguard.Guard | None) -> None:
    """One epoch of the hand-written loop: cross-entropy steps, each followed by the guard's step call."""
    model.train()
    for inputs, targets in loader:
        outputs = model(inputs)
        loss = F.cross_entropy(outputs, targets)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if guard is not None:
            guard.step(outputs, targets, loss=loss)


def with_loop(train_set, eval_set, epochs: int) -> tuple[float, float]:
    model, optimizer, loader = setup(train_set)
    with tempfile.TemporaryDirectory() as out:
        loop = bnguard.Loop(model, optimizer, loader, eval_loader=DataLoader(eval_set, batch_size=128),
                            epochs=epochs, output_dir=out, progress=False)
        start = time.perf_counter()
        loop.fit()
        return time.perf_counter() - start, float("nan")


def described(device: torch.device) -> str:
    """The device the runs trained on, as the table's header names it."""
    if device.type == "cpu":
        return f"CPU, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return str(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    train_set, eval_set = digits(image_size=32)[:2]
    runs = {
        "hand-written Accelerate loop": lambda: hand_written(train_set, eval_set, args.epochs),
        "same loop + Guard, no hooks": lambda: hand_written(train_set, eval_set, args.epochs, guard_hooks=[]),
        "same loop + Guard, default hooks": lambda: hand_written(
            train_set, eval_set, args.epochs, guard_hooks=[bnguard.BNStatsLogger(), bnguard.AutoRecalibrate()]),
        "bnguard.Loop, no hooks": lambda: with_loop(train_set, eval_set, args.epochs),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    inside: dict[str, list[float]] = {name: [] for name in runs}
    hand_written(train_set, eval_set, 1)  # warm-up: first-touch allocations, thread pools
    device = PartialState().device  # where Accelerate put the runs
    for repeat in range(args.repeats):
        order = list(runs) if repeat % 2 == 0 else list(reversed(runs))  # noise hits every run alike
        for name in order:
            total, in_guard = runs[name]()
            times[name].append(total)
            inside[name].append(in_guard / total)
    base = statistics.median(times["hand-written Accelerate loop"])
    steps = args.epochs * len(DataLoader(train_set, batch_size=32))
    print(f"{steps} steps ({args.epochs} epochs of digits, SeedNet w16, batch 32) on {described(device)}, median "
          f"of {args.repeats}")
    print(f"| {'loop':<34} | {'seconds':>8} | {'ms / step':>9} | {'ratio':>6} | {'in Guard calls':>14} |")
    print(f"|{'-' * 36}|{'-' * 10}|{'-' * 11}|{'-' * 8}|{'-' * 16}|")
    for name, values in times.items():
        median, share = statistics.median(values), statistics.median(inside[name])
        shown = f"{100 * share:.2f}%" if share == share else "-"  # NaN: not a Guard run
        print(f"| {name:<34} | {median:>8.3f} | {1000 * median / steps:>9.2f} | {median / base:>6.3f} | "
              f"{shown:>14} |")


if __name__ == "__main__":
    main()
