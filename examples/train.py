"""Train the network of the original question and watch bnguard keep its BatchNorm statistics honest.

    accelerate launch examples/train.py               # digits, offline, about 45 s on 2 CPU cores
    accelerate launch examples/train.py --compare     # the same run without and with bnguard, one plot
    accelerate launch examples/train.py --bnguard off # the problem: eval accuracy swinging between epochs

Leaves in --output-dir: metrics.jsonl (one line per epoch), accuracy.png, the W&B run (offline unless an API
key is configured; the `wandb sync` command is printed) and, with --tracker tensorboard, TensorBoard events;
--tracker mlflow logs to MLflow (where MLFLOW_TRACKING_URI points), --tracker aim to an Aim repository in
--output-dir (pip install 'bnguard[mlflow]' or 'bnguard[aim]' first).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch import nn
from torch.utils.data import DataLoader

import bnguard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import cifar10, digits, image_folder  # noqa: E402
from models import SeedNet  # noqa: E402
from plot import plot_accuracy  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bnguard", choices=["auto", "off", "always", "monitor"], default="auto",
                   help="auto: BNStatsLogger + AutoRecalibrate (default); off: plain running statistics, the "
                        "baseline; always: BNStatsLogger + PreciseBN, recalibrating before every evaluation; "
                        "monitor: AutoRecalibrate(report_only=True), detect and report only")
    p.add_argument("--compare", action="store_true", help="run 'off' and 'auto' with the same seed, plot both")
    p.add_argument("--model", choices=["seednet", "resnet18"], default="seednet",
                   help="seednet: the question's network (7x7 stem, 8 residual blocks, 17 BN layers); "
                        "resnet18: torchvision's")
    p.add_argument("--dataset", choices=["digits", "cifar10", "imagefolder"], default="digits",
                   help="digits: scikit-learn's handwritten digits, shipped offline (default); cifar10 and "
                        "imagefolder (a class-per-folder tree such as the 176-class leaf set) need --data-dir")
    p.add_argument("--data-dir", help="folder of the cifar10 or imagefolder data")
    p.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size per process (default 32)")
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate (default 2e-3)")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam", help="adam (default) or sgd (momentum 0.9)")
    p.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                   help="learning rate schedule: constant, or cosine decay to 0 over the run (default constant)")
    p.add_argument("--bn-momentum", type=float, default=0.01,
                   help="BatchNorm momentum (default 0.01, i.e. Keras' 0.99; PyTorch's default 0.1 shows the same "
                        "dips at --lr 5e-3)")
    p.add_argument("--width", type=int, default=16, help="seednet's first-stage width; 64 is the original (default 16)")
    p.add_argument("--image-size", type=int, default=32, help="input height and width (default 32)")
    p.add_argument("--seed", type=int, default=2, help="seed for the split, the weights and the data order")
    p.add_argument("--limit-batches", type=int, help="cap training batches per epoch, for quick runs")
    p.add_argument("--tracker", choices=["wandb", "tensorboard", "mlflow", "aim", "all", "none"], default="wandb",
                   help="where to log (default wandb, offline when no API key is configured; all: W&B and "
                   "TensorBoard)")
    p.add_argument("--wandb-project", default="bnguard-example",
                   help="W&B project name (the MLflow experiment, the Aim experiment)")
    p.add_argument("--output-dir", help="where outputs go (default runs/<timestamp>)")
    p.add_argument("--num-workers", type=int, default=0, help="data loader worker processes (default 0)")
    p.add_argument("--resume", help="checkpoint folder to resume from, or 'latest' (in --output-dir)")
    p.add_argument("--checkpoint-every", type=int, default=4, help="save a checkpoint every N epochs and at the end")
    p.add_argument("--hist-every", type=int, default=50, help="BN histogram logging interval in steps")
    p.add_argument("--recal-tolerance", type=tolerance, default=bnguard.HOOK_TOLERANCE,
                   help="stop each recalibration once every BatchNorm layer's 95%% error bound is within this "
                        f"(default {bnguard.HOOK_TOLERANCE:g}); 'off': always take --recal-samples")
    p.add_argument("--recal-samples", type=int, default=4096,
                   help="most training samples one recalibration takes (default 4096; at most one pass)")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "width", "image_size", "hist_every", "checkpoint_every", "limit_batches",
                 "recal_samples"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 <= args.bn_momentum <= 1:
        p.error(f"--bn-momentum must be in [0, 1] (PyTorch's convention: 0.1 is its default), got {args.bn_momentum}")
    if not args.lr > 0:
        p.error(f"--lr must be positive, got {args.lr}")
    if args.num_workers < 0:
        p.error(f"--num-workers must be 0 or more, got {args.num_workers}")
    if args.compare and args.resume:
        p.error("--compare starts two fresh runs; --resume continues one: use them separately")
    if args.resume == "latest":
        args.output_dir = run_to_resume(p, args.output_dir)
    return args


def run_to_resume(p: argparse.ArgumentParser, output_dir: str | None) -> str:
    """The folder whose newest checkpoint ``--resume latest`` continues: ``--output-dir``, or else the newest
    run under runs/ that has a checkpoint."""
    if output_dir is None:
        runs = sorted(folder.parent.parent for folder in Path("runs").glob("*/checkpoints/epoch-*"))
        if not runs:
            p.error("--resume latest found no run with a checkpoint under runs/: pass the run's --output-dir")
        print(f"resuming the newest run, {runs[-1]}")
        return str(runs[-1])
    if not any((Path(output_dir) / "checkpoints").glob("epoch-*")):
        p.error(f"--resume latest: {output_dir} holds no checkpoint (checkpoints/epoch-*): start it without "
                "--resume, or pass the --output-dir of the run to continue")
    return output_dir


def tolerance(text: str) -> float | None:
    if text == "off":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1] or 'off', got {text!r}")
    return value


def load_data(args):
    if args.dataset == "digits":
        return digits(args.image_size, seed=args.seed)
    if args.dataset == "cifar10":
        return cifar10(args.data_dir, args.image_size)
    return image_folder(args.data_dir, args.image_size, seed=args.seed)


def build_model(args, channels: int, classes: int) -> nn.Module:
    if args.model == "seednet":
        return SeedNet(classes, width=args.width, in_channels=channels, bn_momentum=args.bn_momentum)
    from torchvision.models import resnet18

    model = resnet18(num_classes=classes)
    model.conv1 = nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = args.bn_momentum
    return model


def hooks_for(mode: str, args) -> list[bnguard.Hook]:
    if mode == "off":
        return []
    budget = {"tolerance": args.recal_tolerance, "num_samples": args.recal_samples}
    repair = {"auto": bnguard.AutoRecalibrate(**budget), "always": bnguard.PreciseBN(**budget),
              "monitor": bnguard.AutoRecalibrate(report_only=True, **budget)}[mode]
    return [bnguard.BNStatsLogger(every_n_steps=args.hist_every), repair]


def train(args, mode: str, data, output_dir: Path, accelerator: Accelerator) -> dict:
    train_set, eval_set, channels, classes = data
    torch.manual_seed(args.seed)
    model = build_model(args, channels, classes)
    if args.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers)
    eval_loader = DataLoader(eval_set, batch_size=256, num_workers=args.num_workers)
    scheduler = None
    if args.schedule == "cosine":  # stepped once per optimizer step, on every process
        steps = args.epochs * min(len(train_loader) // accelerator.num_processes or 1, args.limit_batches or 10**9)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    hooks = hooks_for(mode, args)
    loop = bnguard.Loop(
        model, optimizer, train_loader, eval_loader=eval_loader, scheduler=scheduler, accelerator=accelerator,
        hooks=hooks, epochs=args.epochs, limit_train_batches=args.limit_batches,
        checkpoint_every_epochs=args.checkpoint_every, output_dir=output_dir, tracker=args.tracker,
        project=args.wandb_project, run_name=f"{output_dir.name}-{mode}", seed=args.seed,
        config={**vars(args), "bnguard": mode},
    )
    started = time.perf_counter()
    loop.fit(resume_from=args.resume)
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()] \
        if accelerator.is_main_process else []
    return {"records": records, "seconds": time.perf_counter() - started, "hooks": hooks}


def summary_line(mode: str, result: dict) -> str:
    records = result["records"]
    evals = [r["eval_acc"] for r in records if "eval_acc" in r]
    recals = sum(bool(r.get("recalibrated")) for r in records)
    return (f"[{mode}] best eval accuracy {max(evals):.4f}, final {evals[-1]:.4f}, "
            f"{recals} recalibration(s), {result['seconds']:.1f} s")


def save_staleness(results: dict[str, dict], path: Path) -> Path | None:
    """The layers x recalibrations heatmap of the run that recalibrated, next to accuracy.png."""
    for result in results.values():
        loggers = [hook for hook in result["hooks"] if isinstance(hook, bnguard.BNStatsLogger)]
        if loggers and loggers[0].save_staleness(path) is not None:
            return path
    return None


def resume_command(argv: list[str], output_dir: Path) -> str:
    """The command that continues this run: its own arguments, with --resume latest and its folder."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg in ("--resume", "--output-dir"):
            skip = not skip and "=" not in arg
            continue
        if not arg.startswith(("--resume=", "--output-dir=")):
            kept.append(arg)
    return " ".join(["accelerate launch examples/train.py", *kept, "--resume latest --output-dir", str(output_dir)])


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    data = load_data(args)  # fails with a clear error before anything is written
    output_dir = bnguard.shared_output_dir(accelerator, args.output_dir)
    modes = ["off", "auto"] if args.compare else [args.bnguard]
    results = {}
    try:
        for mode in modes:
            results[mode] = train(args, mode, data, output_dir / mode if args.compare else output_dir, accelerator)
    except KeyboardInterrupt:  # the checkpoints are whole: say how to go on instead of a traceback
        if accelerator.is_main_process and any(output_dir.glob("**/checkpoints/epoch-*")):
            print(f"\ninterrupted; continue from the last checkpoint with:\n  "
                  f"{resume_command(sys.argv[1:] if argv is None else argv, output_dir)}", flush=True)
        elif accelerator.is_main_process:
            print(f"\ninterrupted before the first checkpoint (one every --checkpoint-every {args.checkpoint_every} "
                  "epochs): start the run again", flush=True)
        raise SystemExit(130) from None
    if accelerator.is_main_process:
        plot = plot_accuracy({m: r["records"] for m, r in results.items()}, output_dir / "accuracy.png",
                             title=f"{args.model} on {args.dataset}, {args.optimizer} lr {args.lr}, seed {args.seed}")
        for mode, result in results.items():
            print(summary_line(mode, result))
        print(f"metrics and plot in {output_dir}: {plot}")
        staleness = save_staleness(results, output_dir / "staleness.png")
        if staleness is not None:
            print(f"how far each recalibration moved each layer: {staleness}")
    return results


if __name__ == "__main__":
    main()
