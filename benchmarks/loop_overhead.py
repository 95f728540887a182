"""Cost of bnguard.Loop (no hooks, no trackers) against a minimal hand-written Accelerate loop.

Both train the example's network (SeedNet, width 16) on digits at 32x32 with Adam, batch 32, from the same
initial weights; runs alternate so machine noise hits both alike. Prints one table.

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
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch.utils.data import DataLoader

import bnguard

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from data import digits  # noqa: E402
from models import SeedNet  # noqa: E402


def setup(train_set):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.manual_seed(0)
    model = SeedNet(10, width=16, in_channels=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    return model, optimizer, DataLoader(train_set, batch_size=32, shuffle=True)


def hand_written(train_set, epochs: int) -> float:
    model, optimizer, loader = setup(train_set)
    accelerator = Accelerator()
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for inputs, targets in loader:
            loss = F.cross_entropy(model(inputs), targets)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
    return time.perf_counter() - start


def with_loop(train_set, epochs: int) -> float:
    model, optimizer, loader = setup(train_set)
    with tempfile.TemporaryDirectory() as out:
        loop = bnguard.Loop(model, optimizer, loader, epochs=epochs, output_dir=out, progress=False)
        start = time.perf_counter()
        loop.fit()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    train_set = digits(image_size=32)[0]
    times: dict[str, list[float]] = {"hand-written Accelerate loop": [], "bnguard.Loop, no hooks": []}
    hand_written(train_set, 1)  # warm-up: first-touch allocations, thread pools
    for _ in range(args.repeats):
        times["hand-written Accelerate loop"].append(hand_written(train_set, args.epochs))
        times["bnguard.Loop, no hooks"].append(with_loop(train_set, args.epochs))
    base = statistics.median(times["hand-written Accelerate loop"])
    steps = args.epochs * len(DataLoader(train_set, batch_size=32))
    print(f"{steps} steps ({args.epochs} epochs of digits, SeedNet w16, batch 32) on CPU, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"| {'loop':<30} | {'seconds':>8} | {'ms / step':>9} | {'ratio':>6} |")
    print(f"|{'-' * 32}|{'-' * 10}|{'-' * 11}|{'-' * 8}|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name:<30} | {median:>8.3f} | {1000 * median / steps:>9.2f} | {median / base:>6.3f} |")


if __name__ == "__main__":
    main()
