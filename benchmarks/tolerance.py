"""Recalibration to a stated tolerance against the fixed budgets other tools use, on trained networks.

Trains the example's network (SeedNet, width 16) and torchvision's resnet18 briefly on the digits, then, for
each seed, re-estimates their BatchNorm statistics from one endless stream of batches of 32 drawn from the
training set (reshuffled every epoch, the same stream for every method): bnguard to tolerances 0.5 to 0.003
(capped at --cap-epochs epochs), fvcore's 200 iterations, pycls's 8,192 samples (pooled by bnguard) and
torch's update_bn over one epoch. The reference is the limit of the stream, pooled over many reshuffled
epochs: a layer behind train-mode BatchNorm sees inputs that depend on the batches (their size above all), so
one pass in other batches is not its limit. Prints the medians over seeds: samples used, seconds, the error
reached (the largest over layers and channels of |mean error| / std and |variance error| / variance), the
bound bnguard stated, and eval accuracy with those statistics; then how often the stated bounds held.

    python benchmarks/tolerance.py [--seeds 5] [--train-epochs 4] [--cap-epochs 20] [--reference-epochs 60]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torchvision
from fvcore.nn.precise_bn import update_bn_stats
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader

import bnguard

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from data import digits  # noqa: E402
from models import SeedNet  # noqa: E402

TOLERANCES = (0.5, 0.3, 0.2, 0.1, 0.03, 0.01, 0.003)
BATCH = 32


class Stream:
    """Batches of the training set's images, reshuffled every epoch, endlessly; counts what was drawn."""

    def __init__(self, images: torch.Tensor, seed: int, epochs: int | None = None):
        self.images, self.generator, self.epochs, self.samples = images, torch.Generator().manual_seed(seed), epochs, 0

    def __iter__(self):
        for _ in itertools.count() if self.epochs is None else range(self.epochs):
            for batch in torch.randperm(len(self.images), generator=self.generator).split(BATCH):
                self.samples += len(batch)
                yield self.images[batch]


def trained(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int) -> nn.Module:
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).split(BATCH):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimizer.step()
    return model


def layer_errors(model: nn.Module, reference: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Per layer, the largest over channels of |mean error| / std and |variance error| / variance."""
    layers = dict(model.named_modules())
    errors = {}
    for name, (mean, var) in reference.items():
        layer = layers[name]
        scale = var + layer.eps
        errors[name] = max(((layer.running_mean.double() - mean).abs() / scale.sqrt()).max().item(),
                           ((layer.running_var.double() - var).abs() / scale).max().item())
    return errors


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(images).argmax(dim=1) == labels).double().mean().item()


def methods(cap: int) -> dict:
    def to_tolerance(tolerance):
        return lambda model, stream: bnguard.recalibrate(model, stream, tolerance=tolerance, num_samples=cap,
                                                         progress=False)

    return {
        **{f"bnguard tolerance {t:g}": to_tolerance(t) for t in TOLERANCES},
        "fvcore 200 iterations": lambda model, stream: update_bn_stats(model, stream, num_iters=200),
        "8,192 samples (pycls)": lambda model, stream: bnguard.recalibrate(model, stream, num_samples=8192,
                                                                           progress=False),
        "update_bn, one epoch": lambda model, stream: update_bn(stream, model),
    }


def references(model: nn.Module, images: torch.Tensor, epochs: int) -> tuple[dict, dict, float]:
    """The limit of the stream (bnguard pooled over ``epochs`` reshuffled epochs of another seed), its
    stated bound, and one pass in batches of 256: the exact limit for the first BatchNorm layer, whose
    inputs no train-mode BatchNorm upstream moves."""
    def statistics_of(trial):
        return {name: (layer.running_mean.double(), layer.running_var.double())
                for name, layer in trial.named_modules() if isinstance(layer, _BatchNorm)}

    limit = copy.deepcopy(model)
    report = bnguard.recalibrate(limit, Stream(images, seed=10_000, epochs=epochs), progress=False)
    full_pass = copy.deepcopy(model)
    bnguard.recalibrate(full_pass, DataLoader(images, batch_size=256), progress=False)
    return statistics_of(limit), statistics_of(full_pass), report.error_bound


def new_row(method: str, **values) -> dict:
    row = {"method": method, "samples": [], "seconds": [], "error": [], "bound": [], "accuracy": [], "held": {},
           "first_held": [], "stopped": []}
    row.update(values)
    return row


def measure(model: nn.Module, train_images: torch.Tensor, eval_set: tuple, seeds: int, cap: int,
            reference_epochs: int) -> tuple[list[dict], float]:
    limit, full_pass, limit_bound = references(model, train_images, reference_epochs)
    first = next(iter(limit))
    as_trained, one_pass = copy.deepcopy(model), copy.deepcopy(model)
    bnguard.recalibrate(one_pass, DataLoader(train_images, batch_size=256), progress=False)
    rows = [new_row("as trained (momentum)", error=[max(layer_errors(as_trained, limit).values())],
                    accuracy=[accuracy(as_trained, *eval_set)]),
            new_row("one pass, batches of 256", samples=[len(train_images)],
                    error=[max(layer_errors(one_pass, limit).values())], accuracy=[accuracy(one_pass, *eval_set)])]
    for method, run in methods(cap).items():
        row = new_row(method)
        for seed in range(seeds):
            trial = copy.deepcopy(model)
            stream = Stream(train_images, seed, epochs=1 if method.startswith("update_bn") else None)
            started = time.perf_counter()
            report = run(trial, stream)
            row["seconds"].append(time.perf_counter() - started)
            errors = layer_errors(trial, limit)
            row["samples"].append(stream.samples)
            row["error"].append(max(errors.values()))
            row["accuracy"].append(accuracy(trial, *eval_set))
            if isinstance(report, bnguard.RecalibrationReport) and report.error_bound is not None:
                row["bound"].append(report.error_bound)
                row["stopped"].append(report.stopped)
                for layer in report.recalibrated:
                    row["held"].setdefault(layer.name, []).append(errors[layer.name] <= layer.error_bound)
                row["first_held"].append(layer_errors(trial, {first: full_pass[first]})[first]
                                         <= report.recalibrated[0].error_bound)
        rows.append(row)
    return rows, limit_bound


def median(values: list[float], form: str) -> str:
    return format(statistics.median(values), form) if values else "-"


def stopped(reasons: list[str]) -> str:
    """The reason, or the commonest with how many streams gave it."""
    if not reasons:
        return ""
    reason, count = Counter(reasons).most_common(1)[0]
    return reason if count == len(reasons) else f"{reason} {count}/{len(reasons)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5, help="streams per method (default 5)")
    parser.add_argument("--train-epochs", type=int, default=4)
    parser.add_argument("--cap-epochs", type=int, default=20, help="samples cap of the tolerance runs, in epochs")
    parser.add_argument("--reference-epochs", type=int, default=60, help="epochs pooled for the stream's limit")
    args = parser.parse_args()
    train_set, eval_set, _, classes = digits()
    images, labels = (t.expand(-1, 3, -1, -1) if t.dim() == 4 else t for t in train_set.tensors)
    eval_images, eval_labels = (t.expand(-1, 3, -1, -1) if t.dim() == 4 else t for t in eval_set.tensors)
    torch.manual_seed(0)
    models = {"example SeedNet w16": SeedNet(classes, width=16, bn_momentum=0.01),
              "torchvision resnet18": torchvision.models.resnet18(num_classes=classes)}
    print(f"digits: {len(images)} training images, {len(eval_images)} eval; batches of {BATCH}; "
          f"{args.train_epochs} training epochs; CPU, {torch.get_num_threads()} threads; medians over "
          f"{args.seeds} streams; tolerance runs capped at {args.cap_epochs} epochs; error against the stream's "
          f"limit, estimated from {args.reference_epochs} epochs")
    print(f"| {'model':<20} | {'method':<24} | {'samples':>7} | {'seconds':>7} | {'error':>7} | {'bound':>7} | "
          f"{'eval acc':>8} | {'stopped':<19} |")
    print(f"|{'-' * 22}|{'-' * 26}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 10}|{'-' * 21}|")
    coverage, limit_bounds = [], {}
    for name, model in models.items():
        model = trained(model, images, labels, args.train_epochs)
        rows, limit_bounds[name] = measure(model, images, (eval_images, eval_labels), args.seeds,
                                           args.cap_epochs * len(images), args.reference_epochs)
        for row in rows:
            print(f"| {name:<20} | {row['method']:<24} | {median(row['samples'], '.0f'):>7} | "
                  f"{median(row['seconds'], '.2f'):>7} | {median(row['error'], '.4f'):>7} | "
                  f"{median(row['bound'], '.4f'):>7} | {median(row['accuracy'], '.2%'):>8} | "
                  f"{stopped(row['stopped']):<19} |")
            if row["held"]:
                rates = [statistics.fmean(held) for held in row["held"].values()]
                coverage.append((name, row["method"], statistics.fmean(row["first_held"]), min(rates),
                                 statistics.fmean(rates), len(rates)))
    print("\nthe stream's limit as estimated, its own stated bound: " +
          ", ".join(f"{name} {bound:.4f}" for name, bound in limit_bounds.items()))
    print("how often the stated bound held, over the streams: the first layer against its exact limit (one pass; "
          "no train-mode BatchNorm upstream), every layer against the estimated limit (meaningful only for "
          "bounds well above the limit's own)\n")
    print(f"| {'model':<20} | {'method':<24} | {'first layer':>11} | {'worst layer':>11} | {'mean over layers':>16} | "
          f"{'layers':>6} |")
    print(f"|{'-' * 22}|{'-' * 26}|{'-' * 13}|{'-' * 13}|{'-' * 18}|{'-' * 8}|")
    for name, method, first, worst, mean, layers in coverage:
        print(f"| {name:<20} | {method:<24} | {first:>11.0%} | {worst:>11.0%} | {mean:>16.1%} | {layers:>6} |")


if __name__ == "__main__":
    main()
