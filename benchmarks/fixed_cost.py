"""Where a recalibration's time goes on small inputs: its forward passes, and its work outside them.

For each model, 24 batches of 32 random 32x32 images; every repeat runs, on fresh copies of the same weights,
a plain no-grad eval-mode forward over the batches, torch's update_bn and bnguard.recalibrate, in turn in
either order. The passes are timed inside recalibrate (its pass loop, wrapped here), so "outside the passes"
is everything else it does: setting modes and hooks and putting them back, pooling the rows in float64, the
report and the writes. Each figure is a median over repeats of a difference measured within one repeat, which
a slow spell of this shared machine hardly moves. "Bounds read" is the same with the report's error bounds
read at once, as the hooks do (recalibrate alone computes them when first asked).

    python benchmarks/fixed_cost.py [--repeats 40] [--resnet18-repeats 10]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch.optim.swa_utils import update_bn

import bnguard
from bnguard.recalibration import recalibrate as recalibrate_module

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from models import SeedNet  # noqa: E402


def timed_passes(record: list[float]):
    """recalibrate's pass loop, its time appended to ``record`` at each call."""
    loop = recalibrate_module._run_passes

    def passes(*args, **kwargs):
        start = time.perf_counter()
        result = loop(*args, **kwargs)
        record.append(time.perf_counter() - start)
        return result

    return passes


def measure(model: torch.nn.Module, repeats: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(32, 3, 32, 32, generator=generator) for _ in range(24)]

    def forward(trial):
        trial.eval()
        with torch.no_grad():
            for batch in batches:
                trial(batch)

    def recalibrate(trial, read_bounds=False):
        report = bnguard.recalibrate(trial, batches, progress=False)
        if read_bounds:
            assert report.error_bound is not None  # computed on this first read

    runs = {"forward": forward, "update_bn": lambda trial: update_bn(batches, trial), "bnguard": recalibrate,
            "bnguard, bounds read": lambda trial: recalibrate(trial, read_bounds=True)}
    passes: list[float] = []
    loop = recalibrate_module._run_passes
    recalibrate_module._run_passes = timed_passes(passes)
    figures: dict[str, list[float]] = {name: [] for name in
                                       ("forward", "update_bn", "bnguard", "passes", "outside", "outside, read")}
    try:
        for run in runs.values():  # once untimed: first calls pay for allocations and lazy set-up
            run(copy.deepcopy(model).train())
        for repeat in range(repeats):
            times = {}
            for name in list(runs)[::1 if repeat % 2 else -1]:
                trial = copy.deepcopy(model).train()
                start = time.perf_counter()
                runs[name](trial)
                times[name] = time.perf_counter() - start
                if name.startswith("bnguard"):
                    times[name + " passes"] = passes[-1]
            figures["forward"].append(times["forward"])
            figures["update_bn"].append(times["update_bn"] - times["forward"])
            figures["bnguard"].append(times["bnguard"] - times["update_bn"])
            figures["passes"].append(times["bnguard passes"] - times["update_bn"])
            figures["outside"].append(times["bnguard"] - times["bnguard passes"])
            figures["outside, read"].append(times["bnguard, bounds read"] - times["bnguard, bounds read passes"])
    finally:
        recalibrate_module._run_passes = loop
    return {name: statistics.median(values) * 1e3 for name, values in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=40, help="on the example's network")
    parser.add_argument("--resnet18-repeats", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    models = [("SeedNet w16", SeedNet(num_classes=10, width=16), args.repeats),
              ("resnet18", torchvision.models.resnet18(num_classes=10), args.resnet18_repeats)]
    print(f"24 batches of 32 at 32 px, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; ms, "
          "medians of differences within a repeat")
    print("| model       | forward | update_bn - forward | bnguard - update_bn | its passes - update_bn "
          "| outside the passes | outside, bounds read |")
    print("|-------------|---------|---------------------|---------------------|------------------------"
          "|--------------------|----------------------|")
    for name, model, repeats in models:
        m = measure(model, repeats)
        print(f"| {name:<11} | {m['forward']:7.1f} | {m['update_bn']:19.2f} | {m['bnguard']:+19.2f} | "
              f"{m['passes']:+22.2f} | {m['outside']:18.2f} | {m['outside, read']:20.2f} |")


if __name__ == "__main__":
    main()
