"""Training speed with no logging, with BNStatsLogger every 50 steps, and with wandb.watch(log="all",
log_freq=50): the example's network (SeedNet w16) on digits at 32x32, Adam, batch 32, W&B offline in all
three so that only the logging differs. Steps per second count the training phase only (the fit-start
summary and tracker start-up are outside it); the configurations alternate, median of the repeats. Because
whole-run speed differences of a few percent are within this machine's noise, the logger's own time is also
measured directly, as the share of training time spent inside its calls.

    python benchmarks/logging_overhead.py [--epochs 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate.state import AcceleratorState, GradientState
from torch.utils.data import DataLoader

import bnguard

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from data import digits  # noqa: E402
from models import SeedNet  # noqa: E402


class TrainClock(bnguard.Hook):
    """Sums the wall time of the training phases (epoch start to end of the training part)."""

    def __init__(self):
        self.seconds, self.steps, self._start = 0.0, 0, 0.0

    def on_epoch_start(self, state):
        self._start, self._first_step = time.perf_counter(), state.step

    def on_train_epoch_end(self, state):
        self.seconds += time.perf_counter() - self._start
        self.steps += state.step - self._first_step


class TimedLogger(bnguard.BNStatsLogger):
    """BNStatsLogger that also sums the seconds spent in its step-end calls."""

    seconds = 0.0

    def on_step_end(self, state):
        start = time.perf_counter()
        super().on_step_end(state)
        TimedLogger.seconds += time.perf_counter() - start


class WandbWatch(bnguard.Hook):
    def on_fit_start(self, state):
        state.accelerator.get_tracker("wandb", unwrap=True).watch(state.unwrapped_model, log="all", log_freq=50)


def run(config: str, train_set, epochs: int) -> tuple[float, float]:
    """(steps per second, share of the training time spent inside BNStatsLogger)."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.manual_seed(0)
    model = SeedNet(10, width=16, in_channels=1)
    clock = TrainClock()
    TimedLogger.seconds = 0.0
    hooks = {"no logging": [], "BNStatsLogger every 50 steps": [TimedLogger(every_n_steps=50, on_eval=False)],
             "wandb.watch(log='all', log_freq=50)": [WandbWatch()]}[config]
    with tempfile.TemporaryDirectory() as out:
        loop = bnguard.Loop(model, torch.optim.Adam(model.parameters(), lr=2e-3),
                            DataLoader(train_set, batch_size=32, shuffle=True), epochs=epochs, output_dir=out,
                            hooks=[*hooks, clock], tracker="wandb", progress=False)
        loop.fit()
    return clock.steps / clock.seconds, TimedLogger.seconds / clock.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    train_set = digits(image_size=32)[0]
    configs = ["no logging", "BNStatsLogger every 50 steps", "wandb.watch(log='all', log_freq=50)"]
    speeds: dict[str, list[float]] = {c: [] for c in configs}
    inside: list[float] = []
    for _ in range(args.repeats):
        for config in configs:
            speed, share = run(config, train_set, args.epochs)
            speeds[config].append(speed)
            if config.startswith("BNStatsLogger"):
                inside.append(share)
    base = statistics.median(speeds["no logging"])
    steps = args.epochs * len(DataLoader(train_set, batch_size=32))
    print(f"{steps} training steps, SeedNet w16 on digits 32x32, batch 32, CPU {torch.get_num_threads()} threads, "
          f"W&B offline, median of {args.repeats}")
    print(f"| {'logging':<38} | {'steps / s':>9} | {'cost':>7} |")
    print(f"|{'-' * 40}|{'-' * 11}|{'-' * 9}|")
    for config in configs:
        speed = statistics.median(speeds[config])
        print(f"| {config:<38} | {speed:>9.2f} | {100 * (base / speed - 1):>6.2f}% |")
    print(f"Time spent inside BNStatsLogger's logging calls: {100 * statistics.median(inside):.2f}% of training time")


if __name__ == "__main__":
    main()
