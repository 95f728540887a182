"""The seed question's symptom and its cure on the example's default configuration.

Runs examples/train.py (digits, the question's network) with --bnguard off / auto / always for several
seeds and prints one table: the worst epoch-to-epoch drop of eval accuracy after epoch 2, mean and final eval
accuracy, the number of recalibrations and their total seconds, and wall time.

    python benchmarks/fluctuation.py [--seeds 0 1 2] [-- extra examples/train.py arguments]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import train  # noqa: E402


def worst_drop(evals: list[float]) -> float:
    """Largest fall of eval accuracy from one epoch to the next, from epoch 3 on."""
    return max((evals[i - 1] - evals[i] for i in range(2, len(evals))), default=0.0)


def run(mode: str, seed: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        started = time.perf_counter()
        result = train.main(["--bnguard", mode, "--seed", str(seed), "--tracker", "none",
                             "--output-dir", out, *extra])[mode]
        seconds = time.perf_counter() - started
    records = result["records"]
    evals = [r["eval_acc"] for r in records]
    recals = [r for r in records if r.get("recalibrated")]
    return {"drop": worst_drop(evals), "mean": statistics.fmean(evals), "final": evals[-1],
            "recals": len(recals), "recal_s": sum(r["recal_seconds"] for r in recals), "wall": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=["off", "auto", "always"])
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    print(f"examples/train.py defaults{' ' + ' '.join(extra) if extra else ''}; eval accuracy in points")
    print(f"| {'bnguard':<7} | {'seed':>4} | {'worst drop':>10} | {'mean eval':>9} | {'final eval':>10} | "
          f"{'recals':>6} | {'recal s':>7} | {'wall s':>6} |")
    print(f"|{'-' * 9}|{'-' * 6}|{'-' * 12}|{'-' * 11}|{'-' * 12}|{'-' * 8}|{'-' * 9}|{'-' * 8}|")
    for seed in args.seeds:
        for mode in args.modes:
            r = run(mode, seed, extra)
            print(f"| {mode:<7} | {seed:>4} | {100 * r['drop']:>10.1f} | {100 * r['mean']:>9.1f} | "
                  f"{100 * r['final']:>10.1f} | {r['recals']:>6} | {r['recal_s']:>7.2f} | {r['wall']:>6.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
