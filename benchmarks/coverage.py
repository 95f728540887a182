"""How often recalibrate's stated error bound holds, on data whose limit is known exactly.

For each kind of data and tolerance, recalibrates one BatchNorm layer many times from independent streams
and counts how often the error actually reached (the largest over channels of |mean error| / std and
|variance error| / variance against the known limit) was within the bound the report stated; about 95% is
what the bound promises. Kinds:

- independent values: mean 3, variance 4 in each of 8 channels, a fresh draw for every batch;
- images: one offset per image and channel plus a little pixel noise (36 nearly equal pixels per image, so a
  bound from the element count would be 6 times too small), a fresh draw for every batch;
- digits, first layer: the example's stem (7x7 convolution and its BatchNorm) on the digits training set,
  reshuffled every epoch; the limit is the full pass over the 1,347 images, computed in float64. Batches
  drawn without replacement from a finite set err less than independent draws, so here the bound is
  conservative by design.

    python benchmarks/coverage.py [--runs 200]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

import bnguard

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from data import digits  # noqa: E402
from models import SeedNet  # noqa: E402

TOLERANCES = (0.3, 0.1, 0.03)


def independent_values(generator):
    return torch.randn(16, 8, generator=generator) * 2 + 3


def images(generator):
    return torch.randn(16, 8, 1, 1, generator=generator) + 0.1 * torch.randn(16, 8, 6, 6, generator=generator)


def fresh_draws(make_batch):
    def stream(seed):
        generator = torch.Generator().manual_seed(seed)
        return (make_batch(generator) for _ in itertools.count())
    return stream


def reshuffled(features: torch.Tensor):
    def stream(seed):
        generator = torch.Generator().manual_seed(seed)
        for _ in itertools.count():
            yield from features[torch.randperm(len(features), generator=generator)].split(32)
    return stream


def digits_first_layer():
    """The stem's convolution outputs (computed once: the layer's input does not depend on its statistics),
    a BatchNorm like the stem's, and their full-pass mean and variance."""
    train_set = digits()[0]
    torch.manual_seed(0)
    stem = SeedNet(10, width=16, in_channels=1).stem
    with torch.no_grad():
        features = stem[0](train_set.tensors[0])
    exact = features.double()
    return (reshuffled(features), copy.deepcopy(stem[1]), exact.mean(dim=(0, 2, 3)),
            exact.var(dim=(0, 2, 3)))


def coverage(stream, layer, mean, var, tolerance, runs):
    """Share of runs whose error was within the stated bound, median samples, median error / bound."""
    held, samples, ratios = 0, [], []
    for seed in range(runs):
        bn = copy.deepcopy(layer)
        report = bnguard.recalibrate(bn, stream(seed), tolerance=tolerance, progress=False)
        scale = torch.as_tensor(var, dtype=torch.float64) + bn.eps
        error = torch.maximum((bn.running_mean.double() - mean).abs() / scale.sqrt(),
                              (bn.running_var.double() - var).abs() / scale).max().item()
        held += error <= report.error_bound
        samples.append(report.samples)
        ratios.append(error / report.error_bound)
    return held / runs, statistics.median(samples), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200, help="streams per kind and tolerance (default 200)")
    args = parser.parse_args()
    kinds = {"independent values": (fresh_draws(independent_values), nn.BatchNorm1d(8), 3.0, 4.0),
             "images, one offset each": (fresh_draws(images), nn.BatchNorm2d(8), 0.0, 1.01),
             "digits, first layer": digits_first_layer()}
    print(f"{args.runs} streams per row; 95% is what the bound promises")
    print(f"| {'data':<24} | {'tolerance':>9} | {'bound held':>10} | {'samples':>7} | {'error / bound':>13} |")
    print(f"|{'-' * 26}|{'-' * 11}|{'-' * 12}|{'-' * 9}|{'-' * 15}|")
    for name, (stream, layer, mean, var) in kinds.items():
        for tolerance in TOLERANCES:
            held, samples, ratio = coverage(stream, layer, mean, var, tolerance, args.runs)
            print(f"| {name:<24} | {tolerance:>9g} | {held:>10.1%} | {samples:>7.0f} | {ratio:>13.2f} |")


if __name__ == "__main__":
    main()
