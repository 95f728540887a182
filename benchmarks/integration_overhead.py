"""Cost of the framework adapters with no hooks: a Lightning fit and a Hugging Face Trainer run, each bare and
with bnguard's callback (an empty hook list), on the same data from the same weights.

Lightning trains the example's SeedNet (width 16), Hugging Face transformers' ResNet from examples/hf_trainer.py,
both on digits at 32x32, batch 32, evaluating every epoch. Bare and adapter runs alternate so that machine
noise hits both alike (each goes first every other time); only fit() / train() is timed, and the time spent
inside the adapter's event methods is measured directly as well, since whole-run differences of a percent or
two are this machine's noise.
Prints one table.

    python benchmarks/integration_overhead.py [--epochs 3] [--repeats 5]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import transformers
from torch.utils.data import DataLoader

from bnguard.integrations.lightning import BNGuardCallback as LightningCallback
from bnguard.integrations.transformers import BNGuardCallback as TransformersCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from data import digits  # noqa: E402
from hf_trainer import AsDicts, accuracy, build_model  # noqa: E402
from lightning_train import DigitsClassifier  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stopwatch import Stopwatch  # noqa: E402


def lightning_run(data, epochs: int, callback) -> float:
    train_set, eval_set, channels, classes = data
    pl.seed_everything(0, verbose=False)
    model = DigitsClassifier(channels, classes, width=16, bn_momentum=0.01, lr=2e-3)
    with tempfile.TemporaryDirectory() as out:
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                             callbacks=[callback] if callback else [], enable_checkpointing=False,
                             default_root_dir=out, num_sanity_val_steps=0, enable_progress_bar=False,
                             enable_model_summary=False)
        loaders = DataLoader(train_set, batch_size=32, shuffle=True), DataLoader(eval_set, batch_size=256)
        start = time.perf_counter()
        trainer.fit(model, *loaders)
        return time.perf_counter() - start


def transformers_run(data, epochs: int, callback) -> float:
    train_set, eval_set, _, classes = data
    with tempfile.TemporaryDirectory() as out:
        settings = transformers.TrainingArguments(
            output_dir=out, num_train_epochs=epochs, per_device_train_batch_size=32, per_device_eval_batch_size=256,
            learning_rate=2e-3, eval_strategy="epoch", logging_strategy="epoch", save_strategy="no",
            report_to="none", disable_tqdm=True, use_cpu=True, seed=0)
        trainer = transformers.Trainer(model=build_model(classes, 0.01, seed=0), args=settings,
                                       train_dataset=AsDicts(train_set), eval_dataset=AsDicts(eval_set),
                                       compute_metrics=accuracy,
                                       callbacks=[callback] if callback else [])
        trainer.remove_callback(transformers.PrinterCallback)  # no log lines between the table's runs
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    transformers.logging.set_verbosity_error()
    data = digits(image_size=32)
    runs = {"Lightning": (lightning_run, LightningCallback), "Hugging Face Trainer": (transformers_run,
                                                                                  TransformersCallback)}
    times = {(name, adapter): [] for name in runs for adapter in (False, True)}
    inside = {name: [] for name in runs}
    for run, _ in runs.values():  # warm-up: first-touch allocations, thread pools, imports
        run(data, 1, None)
    for repeat in range(args.repeats):
        for name, (run, adapter) in runs.items():
            for with_adapter in (False, True) if repeat % 2 == 0 else (True, False):  # neither always first
                callback = adapter([]) if with_adapter else None
                events = [method for method in dir(callback) if method.startswith("on_")]
                stopwatch = Stopwatch(callback, events) if with_adapter else None
                times[name, with_adapter].append(run(data, args.epochs, callback))
                if with_adapter:
                    inside[name].append(stopwatch.seconds / times[name, True][-1])
    steps = args.epochs * len(DataLoader(data[0], batch_size=32))
    print(f"{steps} training steps ({args.epochs} epochs of digits, batch 32, evaluation every epoch) on CPU, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"| {'framework':<22} | {'bare s':>7} | {'adapter s':>9} | {'ratio':>6} | {'inside adapter':>14} |")
    print(f"|{'-' * 24}|{'-' * 9}|{'-' * 11}|{'-' * 8}|{'-' * 16}|")
    for name in runs:
        bare, adapter = statistics.median(times[name, False]), statistics.median(times[name, True])
        share = f"{100 * statistics.median(inside[name]):.2f}%"
        print(f"| {name:<22} | {bare:>7.3f} | {adapter:>9.3f} | {adapter / bare:>6.3f} | {share:>14} |")


if __name__ == "__main__":
    main()
