"""Recalibration accuracy and cost: bnguard against fvcore's update_bn_stats and torch's update_bn.

Prints one table. For each model and input centering, every method re-estimates the BN statistics of the same
weights from the same batches; the error is the largest relative error of any channel's running_var against a
float64 reference captured from the BN inputs, the time is the method's median wall time divided by the median
of a plain no-grad eval-mode forward over the same batches, all measured side by side in this run.

    python benchmarks/recalibration.py [--batches 24] [--batch-size 32] [--repeats 3] [--device cpu]
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
from fvcore.nn.precise_bn import update_bn_stats
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import update_bn

import bnguard

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from models import SeedNet  # noqa: E402


def reference(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Pooled float64 mean and unbiased variance of each BN layer's inputs (train mode, captured by pre-hooks)."""
    model = copy.deepcopy(model).train()
    sums: dict[str, list[torch.Tensor]] = {}

    def capture(name):
        def hook(module, args):
            x = args[0].detach().double().transpose(0, 1).reshape(args[0].shape[1], -1)
            sums.setdefault(name, []).append(x)

        return hook

    for name, layer in model.named_modules():
        if isinstance(layer, _BatchNorm):
            layer.register_forward_pre_hook(capture(name))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    out = {}
    for name, parts in sums.items():
        values = torch.cat(parts, dim=1)
        out[name] = (values.mean(dim=1), values.var(dim=1))
    return out


def max_relative_var_error(model: nn.Module, ref: dict) -> float:
    layers = dict(model.named_modules())
    return max(((layers[n].running_var.double() - v).abs() / v).max().item() for n, (_, v) in ref.items())


def run_bnguard(model, batches):
    bnguard.recalibrate(model, batches, progress=False)


def run_fvcore(model, batches):
    update_bn_stats(model, batches, num_iters=len(batches))


def run_update_bn(model, batches):
    update_bn(batches, model)


METHODS = {"bnguard": run_bnguard, "fvcore update_bn_stats": run_fvcore, "torch update_bn": run_update_bn}


def plain_forward(model, batches):
    model.eval()
    with torch.no_grad():
        for batch in batches:
            model(batch)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(name: str, model: nn.Module, batches: list[torch.Tensor], repeats: int, device: str) -> list[tuple]:
    ref = reference(model, batches)
    times: dict[str, list[float]] = {m: [] for m in ["forward", *METHODS]}
    errors = {}
    for _ in range(repeats):  # interleaved, so that machine noise hits every method alike
        for method in times:
            trial = copy.deepcopy(model).train()
            synchronize(device)
            start = time.perf_counter()
            (plain_forward if method == "forward" else METHODS[method])(trial, batches)
            synchronize(device)
            times[method].append(time.perf_counter() - start)
            if method != "forward":
                errors[method] = max_relative_var_error(trial, ref)
    forward = statistics.median(times["forward"])
    return [(name, m, errors[m], statistics.median(times[m]) / forward) for m in METHODS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    models = {
        "resnet18": torchvision.models.resnet18(num_classes=10),
        "example SeedNet w16": SeedNet(num_classes=10, width=16),
    }
    rows = []
    for model_name, model in models.items():
        model = model.to(args.device)
        with torch.no_grad():  # a few steps of train-mode forward, so the running statistics are not defaults
            for _ in range(3):
                model.train()(torch.randn(args.batch_size, 3, 32, 32, device=args.device))
        for label, center in (("mean 0", 0.0), ("mean 100 std", 100.0)):
            batches = [
                torch.randn(args.batch_size, 3, 32, 32, device=args.device) + center for _ in range(args.batches)
            ]
            rows += measure(f"{model_name}, {label}", model, batches, args.repeats, args.device)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.batches} batches of {args.batch_size} x 3 x 32 x 32 on {device}, median of {args.repeats}")
    print(f"| {'model, inputs':<34} | {'method':<22} | {'max rel. var error':>18} | {'time / forward':>14} |")
    print(f"|{'-' * 36}|{'-' * 24}|{'-' * 20}|{'-' * 16}|")
    for model_name, method, error, ratio in rows:
        print(f"| {model_name:<34} | {method:<22} | {error:>18.2e} | {ratio:>14.2f} |")


if __name__ == "__main__":
    main()
