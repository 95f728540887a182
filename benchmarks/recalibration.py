"""Recalibration accuracy, time and memory: bnguard against fvcore's update_bn_stats and torch's update_bn.

Prints one table. For each model and input centering, every method re-estimates the BN statistics of the same
weights from the same batches; the error is the largest relative error of any channel's running_var against a
float64 reference captured from the BN inputs; the time is the median over repeats of the method's wall time
divided by that of a plain no-grad eval-mode forward over the same batches in the same repeat (the methods of a
repeat run back to back, in turn first and last, so that a slow spell of the machine weighs on the ratio
less), and "- update_bn" the median over repeats of (the method's time - update_bn's) / the forward's, the
gap measured pair by pair (below 0: faster than update_bn); the memory
is the method's peak of memory allocated by torch above a plain forward's (on CUDA the allocator's own peak,
on the CPU the running total carried by the allocation events of torch's profiler). "bnguard tol 0.3" stops
at the hooks' default tolerance and gives the batches it used.

Small inputs (resnet18 and the example's network at 32 px) show the fixed cost of a recalibration, large ones
(resnet50 at 224 px) the cost per batch.

    python benchmarks/recalibration.py [--batches 24] [--batch-size 32] [--large-batches N]
        [--large-batch-size N] [--small-repeats 15] [--repeats 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import peak_cpu, peak_cuda  # noqa: E402

MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "SeedNet w16": lambda: SeedNet(num_classes=10, width=16),
    "resnet50": lambda: torchvision.models.resnet50(num_classes=1000),
}


def reference(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pooled float64 unbiased variance of each BN layer's inputs (train mode, captured by pre-hooks), from
    per-batch float64 sums so that large inputs need no copy of every activation."""
    model = copy.deepcopy(model).train()
    sums: dict[str, torch.Tensor] = {}

    def capture(name):
        def hook(module, args):
            x = args[0].detach().double().transpose(0, 1).reshape(args[0].shape[1], -1)
            moments = torch.stack([torch.full_like(x[:, 0], x.shape[1]), x.sum(dim=1), x.square().sum(dim=1)])
            sums[name] = sums.get(name, 0) + moments

        return hook

    for name, layer in model.named_modules():
        if isinstance(layer, _BatchNorm):
            layer.register_forward_pre_hook(capture(name))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    # Around a float64 first pass this is exact enough for the errors measured (>= 1e-8): the inputs of
    # the "mean 100 std" rows lose about 1e-12 of their variance here.
    return {name: (s[2] - s[1].square() / s[0]) / (s[0] - 1) for name, s in sums.items()}


def max_relative_var_error(model: nn.Module, ref: dict[str, torch.Tensor]) -> float:
    layers = dict(model.named_modules())
    return max(((layers[n].running_var.double() - v).abs() / v).max().item() for n, v in ref.items())


def run_bnguard(model, batches):
    return bnguard.recalibrate(model, batches, progress=False).batches


def run_bnguard_tolerance(model, batches):
    return bnguard.recalibrate(model, batches, tolerance=bnguard.HOOK_TOLERANCE, progress=False).batches


def run_fvcore(model, batches):
    update_bn_stats(model, batches, num_iters=len(batches))


def run_update_bn(model, batches):
    update_bn(batches, model)


def plain_forward(model, batches):
    model.eval()
    with torch.no_grad():
        for batch in batches:
            model(batch)


METHODS = {"bnguard": run_bnguard, f"bnguard tol {bnguard.HOOK_TOLERANCE:g}": run_bnguard_tolerance,
           "fvcore update_bn_stats": run_fvcore, "torch update_bn": run_update_bn}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_batches(spec: tuple[int, int, int, float], device: str) -> list[torch.Tensor]:
    count, size, pixels, center = spec
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 3, pixels, pixels, generator=generator) + center).to(device) for _ in range(count)]


def prepared(model_name: str, device: str) -> nn.Module:
    """The model with running statistics that are not the defaults (three train-mode forwards of inputs
    small enough to leave the peak memory to the method measured after them)."""
    torch.manual_seed(0)
    model = MODELS[model_name]().to(device)
    with torch.no_grad():
        for _ in range(3):
            model.train()(torch.randn(2, 3, 32, 32, device=device))
    return model


def measure(model_name: str, spec: tuple, repeats: int, device: str, memory: dict[str, int]) -> list[tuple]:
    """The table's rows for one model and one kind of input; ``memory`` holds each method's peak for this
    model once measured (it does not depend on the inputs' centering)."""
    model = prepared(model_name, device)
    batches = make_batches(spec, device)
    ref = reference(model, batches)
    times: dict[str, list[float]] = {m: [] for m in ["forward", *METHODS]}
    errors, used = {}, {}
    for repeat in range(repeats):  # interleaved, so that machine noise hits every method alike
        for method in list(times)[::1 if repeat % 2 else -1]:  # and in turn first and last
            trial = copy.deepcopy(model).train()
            synchronize(device)
            start = time.perf_counter()
            outcome = (plain_forward if method == "forward" else METHODS[method])(trial, batches)
            synchronize(device)
            times[method].append(time.perf_counter() - start)
            if method != "forward":
                errors[method], used[method] = max_relative_var_error(trial, ref), outcome or len(batches)
    for method in times:
        run = (plain_forward if method == "forward" else METHODS[method])
        if method not in memory:
            trial = copy.deepcopy(model).train()
            memory[method] = (peak_cuda if device.startswith("cuda") else peak_cpu)(lambda: run(trial, batches))
    label = f"{model_name} {spec[2]} px, {'mean 0' if spec[3] == 0 else 'mean 100 std'}"

    def per_forward(method: str, minus: str | None = None) -> float:
        """The median over repeats of the method's time (less ``minus``'s in the same repeat) over the forward's."""
        less = times[minus] if minus else [0.0] * repeats
        return statistics.median((t - o) / f for t, o, f in zip(times[method], less, times["forward"]))

    return [(label, m, used[m], errors[m], per_forward(m), per_forward(m, "torch update_bn"),
             (memory[m] - memory["forward"]) / 2**20) for m in METHODS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    cuda = parser.parse_known_args()[0].device.startswith("cuda")
    parser.add_argument("--large-batches", type=int, default=12 if cuda else 4,
                        help="resnet50 224 px batches (default 12 on CUDA, 4 on the CPU; 0: no such rows)")
    parser.add_argument("--large-batch-size", type=int, default=128 if cuda else 16)
    parser.add_argument("--repeats", type=int, default=5, help="of the 224 px rows")
    parser.add_argument("--small-repeats", type=int, default=15, help="of the 32 px rows")
    args = parser.parse_args()
    runs = [(name, (args.batches, args.batch_size, 32, center))
            for name in ("resnet18", "SeedNet w16") for center in (0.0, 100.0)]
    if args.large_batches:
        runs.append(("resnet50", (args.large_batches, args.large_batch_size, 224, 0.0)))
    memory: dict[str, dict[str, int]] = {name: {} for name in MODELS}
    rows = [row for name, spec in runs for row in measure(
        name, spec, args.repeats if spec[2] == 224 else args.small_repeats, args.device, memory[name])]
    device = (torch.cuda.get_device_name() if args.device.startswith("cuda")
              else f"CPU, {torch.get_num_threads()} threads")
    print(f"{args.batches} batches of {args.batch_size} at 32 px, {args.large_batches} of {args.large_batch_size} "
          f"at 224 px, on {device}, median of {args.small_repeats} and {args.repeats}, torch {torch.__version__}")
    print(f"| {'model, inputs':<36} | {'method':<22} | {'batches':>7} | {'max rel. var error':>18} | "
          f"{'time / forward':>14} | {'- update_bn':>11} | {'extra memory':>12} |")
    print(f"|{'-' * 38}|{'-' * 24}|{'-' * 9}|{'-' * 20}|{'-' * 16}|{'-' * 13}|{'-' * 14}|")
    for label, method, used, error, ratio, behind, extra in rows:
        print(f"| {label:<36} | {method:<22} | {used:>7} | {error:>18.2e} | {ratio:>14.2f} | {behind:>+11.3f} | "
              f"{extra:>8.1f} MiB |")


if __name__ == "__main__":
    main()
