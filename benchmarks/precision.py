"""How exact recalibration is when the inputs' mean is far above their spread.

The pooled merge runs in float64, but each batch's mean and variance come from BatchNorm's own kernel in
float32. This prints the largest relative error of running_var against the float64 variance of the very
same float32 inputs, for growing |mean| / std, with small batches (the hard case).

    python benchmarks/precision.py [--batch-size 8] [--batches 64] [--trials 5]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import bnguard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=64)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"BatchNorm1d({args.channels}), {args.batches} batches of {args.batch_size}, worst of {args.trials} trials")
    print(f"| {'|mean| / std':>12} | {'max rel. var error':>18} |")
    print(f"|{'-' * 14}|{'-' * 20}|")
    for ratio in (0, 10, 190, 2_000, 20_000):
        worst = 0.0
        for _ in range(args.trials):
            batches = [torch.randn(args.batch_size, args.channels) + ratio for _ in range(args.batches)]
            layer = nn.BatchNorm1d(args.channels)
            bnguard.recalibrate(layer, batches, progress=False)
            exact = torch.cat(batches).double().var(dim=0)
            worst = max(worst, ((layer.running_var.double() - exact).abs() / exact).max().item())
        print(f"| {ratio:>12,} | {worst:>18.2e} |", flush=True)


if __name__ == "__main__":
    main()
