"""Growth over a long run: does the thousandth evaluation cost what the first did?

A network of 120 BatchNorm layers (3x3 convolutions of 8 channels on 8x8 inputs) is trained for one step
between evaluations, with BNStatsLogger (histograms of every layer at each evaluation, the at-a-glance
charts and heatmap) and PreciseBN (a recalibration before every evaluation), logging to an offline W&B run
through Accelerate. For each quarter of the run the table gives the seconds per evaluation, what the W&B run
folder grew by per evaluation, the process's resident memory at the quarter's end, and the size of the hooks'
checkpoint state.

    python benchmarks/long_run.py [--evaluations 1000] [--layers 120]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

import bnguard


def network(layers: int) -> nn.Module:
    blocks = [nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
              for _ in range(layers)]
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4))


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evaluations", type=int, default=1000)
    parser.add_argument("--layers", type=int, default=120)
    parser.add_argument("--tracker", choices=["wandb", "none"], default="wandb",
                        help="none: the same run without W&B, to tell its own growth from bnguard's")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    torch.manual_seed(0)
    model = network(args.layers)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    images, labels = torch.randn(64, 1, 8, 8), torch.randint(0, 4, (64,))
    batches = [images[i:i + 16] for i in range(0, 64, 16)]
    process = psutil.Process()
    with tempfile.TemporaryDirectory() as out:
        accelerator = Accelerator(cpu=True)
        bnguard.start_trackers(accelerator, args.tracker, project="bnguard-long-run", output_dir=out)
        logger = bnguard.BNStatsLogger(every_n_steps=10 ** 9)
        runner = bnguard.HookRunner([logger, bnguard.PreciseBN()], accelerator=accelerator, model=model,
                                    evaluate=lambda: {"eval_acc": 0.5}, train_batches=lambda: batches)
        runner.fire("on_fit_start")
        print(f"{args.evaluations} evaluations, {args.layers} BatchNorm layers, a recalibration and logging to "
              f"{args.tracker} at each, CPU, {torch.get_num_threads()} threads")
        print(f"| {'evaluations':>12} | {'s / eval':>8} | {'W&B KB / eval':>13} | {'RSS MB':>7} | "
              f"{'hook state KB':>13} |")
        print(f"|{'-' * 14}|{'-' * 10}|{'-' * 15}|{'-' * 9}|{'-' * 15}|", flush=True)
        quarters, rows = [args.evaluations * q // 4 for q in (1, 2, 3, 4)], []
        started, wandb_before = time.perf_counter(), folder_bytes(Path(out))
        for evaluation in range(1, args.evaluations + 1):
            runner.fire("on_epoch_start", epoch=evaluation - 1, record={}, train_metrics={}, eval_metrics={})
            F.cross_entropy(model.train()(images[:16]), labels[:16]).backward()
            optimizer.step()
            optimizer.zero_grad()
            runner.fire("on_step_end", step=evaluation)
            runner.fire("on_train_epoch_end", train_metrics={"train_acc": 0.6})
            runner.fire("on_eval_start")
            runner.fire("on_eval_end", eval_metrics={"eval_acc": 0.5})
            runner.fire("on_epoch_end")
            if evaluation in quarters:
                seconds, wandb_now = time.perf_counter() - started, folder_bytes(Path(out))
                count = evaluation - (rows[-1]["end"] if rows else 0)
                state = io.BytesIO()
                torch.save(runner.state_dict(), state)
                rows.append({"end": evaluation, "seconds": seconds / count, "wandb": (wandb_now - wandb_before) / count,
                             "rss": process.memory_info().rss, "state": state.getbuffer().nbytes})
                row, span = rows[-1], f"{evaluation - count + 1}-{evaluation}"
                print(f"| {span:>12} | {row['seconds']:>8.3f} | {row['wandb'] / 1024:>13.1f} | "
                      f"{row['rss'] / 2 ** 20:>7.0f} | {row['state'] / 1024:>13.1f} |", flush=True)
                started, wandb_before = time.perf_counter(), folder_bytes(Path(out))
        runner.fire("on_fit_end")
        accelerator.end_training()


if __name__ == "__main__":
    main()
