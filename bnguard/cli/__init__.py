"""``bnguard`` on the command line: inspect and repair the BatchNorm statistics of a saved model."""

from __future__ import annotations

import os
import sys
import traceback

from .arguments import parse_args
from .errors import BAD_INPUT, DONE, FAILED, NOT_WRITTEN_UNLIKE, NOT_WRITTEN_WORSE, InputError

__all__ = ["BAD_INPUT", "DONE", "FAILED", "NOT_WRITTEN_UNLIKE", "NOT_WRITTEN_WORSE", "main"]


def main(argv: list[str] | None = None) -> int:
    """Runs one command and returns its exit code (bad options exit with 2 through argparse)."""
    args = parse_args(argv)  # before torch is imported: --help and bad options answer at once
    from .commands import run

    try:
        return run(args)
    except InputError as error:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process meets it: one says it
            print(f"bnguard {args.command}: {error}", file=sys.stderr)
        return BAD_INPUT
    except Exception:  # noqa: BLE001 - anything else is a failure to report, with where it happened
        traceback.print_exc()
        print(f"bnguard {args.command}: failed; no checkpoint was written", file=sys.stderr)
        return FAILED
