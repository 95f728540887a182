"""The seed question's symptom and its cure on the example's default configuration, over many seeds.

Runs examples/train.py (digits, the question's network) with --bnguard off / auto / always for every seed,
in parallel worker processes of one thread each, and prints one row per run, then one row per mode: the
median and range over seeds of the mean eval accuracy, of the worst epoch-to-epoch dip of eval accuracy after
epoch 2, of the final eval accuracy and of the share of training time spent recalibrating (the hooks'
recal_seconds against the time of Loop.fit). A single run's dips are anecdotes (a CPU run's trajectory differs
between processors); medians and ranges over seeds are what holds.

    python benchmarks/fluctuation.py [--seeds 0 1 ... 7] [--workers 2] [-- extra examples/train.py arguments]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def worst_drop(evals: list[float]) -> float:
    """Largest fall of eval accuracy from one epoch to the next, from epoch 3 on."""
    return max((evals[i - 1] - evals[i] for i in range(2, len(evals))), default=0.0)


def one_thread() -> None:
    import torch

    torch.set_num_threads(1)  # the workers share the cores: one thread each


def run(mode: str, seed: int, extra: list[str]) -> dict:
    sys.path.insert(0, str(EXAMPLES))
    import train

    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        started = time.perf_counter()
        result = train.main(["--bnguard", mode, "--seed", str(seed), "--tracker", "none",
                             "--output-dir", out, *extra])[mode]
        seconds = time.perf_counter() - started
    records = result["records"]
    evals = [r["eval_acc"] for r in records]
    recals = [r for r in records if r.get("recalibrated")]
    return {"mode": mode, "seed": seed, "drop": worst_drop(evals), "mean": statistics.fmean(evals),
            "final": evals[-1], "recals": len(recals), "recal_s": sum(r["recal_seconds"] for r in recals),
            "recal_samples": statistics.fmean(r["recal_samples"] for r in recals) if recals else 0.0,
            "training_s": result["seconds"], "wall": seconds}


def share(run: dict) -> float:
    """Recalibration seconds as a share of the training run's."""
    return run["recal_s"] / run["training_s"]


def spread(values: list[float]) -> str:
    """Median [min, max], in points."""
    return f"{100 * statistics.median(values):5.1f} [{100 * min(values):4.1f}, {100 * max(values):5.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--modes", nargs="+", default=["off", "auto", "always"])
    parser.add_argument("--workers", type=int, default=2, help="parallel runs, one thread each (default 2)")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    started = time.perf_counter()
    jobs = [(mode, seed) for seed in args.seeds for mode in args.modes]
    context = multiprocessing.get_context("spawn")  # a fork after torch has used its thread pool can hang
    with ProcessPoolExecutor(args.workers, mp_context=context, initializer=one_thread) as pool:
        results = list(pool.map(run, *zip(*jobs), [extra] * len(jobs)))
    print(f"examples/train.py defaults{' ' + ' '.join(extra) if extra else ''}; {len(args.seeds)} seeds, "
          f"{args.workers} workers of 1 thread; eval accuracy in points")
    print(f"| {'bnguard':<7} | {'seed':>4} | {'worst dip':>9} | {'mean eval':>9} | {'final eval':>10} | "
          f"{'recals':>6} | {'samples':>7} | {'recal s':>7} | {'recal %':>7} | {'wall s':>6} |")
    print(f"|{'-' * 9}|{'-' * 6}|{'-' * 11}|{'-' * 11}|{'-' * 12}|{'-' * 8}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 8}|")
    for r in sorted(results, key=lambda r: (args.modes.index(r["mode"]), r["seed"])):
        print(f"| {r['mode']:<7} | {r['seed']:>4} | {100 * r['drop']:>9.1f} | {100 * r['mean']:>9.1f} | "
              f"{100 * r['final']:>10.1f} | {r['recals']:>6} | {r['recal_samples']:>7.0f} | {r['recal_s']:>7.2f} | "
              f"{100 * share(r):>7.2f} | {r['wall']:>6.1f} |")
    print(f"\nmedian [min, max] over {len(args.seeds)} seeds:\n")
    print(f"| {'bnguard':<7} | {'mean eval':>19} | {'worst dip':>19} | {'final eval':>19} | {'recals':>6} | "
          f"{'samples':>7} | {'recal %':>7} |")
    print(f"|{'-' * 9}|{'-' * 21}|{'-' * 21}|{'-' * 21}|{'-' * 8}|{'-' * 9}|{'-' * 9}|")
    for mode in args.modes:
        rows = [r for r in results if r["mode"] == mode]
        recals = statistics.median(r["recals"] for r in rows)
        samples = statistics.median(r["recal_samples"] for r in rows)
        recal_share = statistics.median(share(r) for r in rows)
        print(f"| {mode:<7} | {spread([r['mean'] for r in rows]):>19} | {spread([r['drop'] for r in rows]):>19} | "
              f"{spread([r['final'] for r in rows]):>19} | {recals:>6g} | {samples:>7.0f} | "
              f"{100 * recal_share:>7.2f} |")
    print(f"\n{len(jobs)} runs in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
