"""What bnguard shows in the terminal: progress bars only where a person is watching."""

from __future__ import annotations

import sys
import warnings


def show_progress(requested: bool, is_main_process: bool = True) -> bool:
    """Progress bars are drawn on the main process, when asked for, and only on an interactive terminal:
    in a log file they would be noise."""
    return requested and is_main_process and sys.stderr.isatty()


def text_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """The header and rows as lines of left-aligned columns two spaces apart."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]


class WarnOnce:
    """Warnings said once per kind of trouble (a key), however often it recurs: a hook that cannot do its
    job at every evaluation should say so once, not fill the log."""

    def __init__(self) -> None:
        self.said: set[str] = set()

    def __call__(self, key: str, message: str) -> None:
        if key not in self.said:
            self.said.add(key)
            warnings.warn(message, stacklevel=3)
