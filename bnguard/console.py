"""What bnguard shows in the terminal: progress bars only where a person is watching."""

from __future__ import annotations

import sys
import warnings


def show_progress(requested: bool, is_main_process: bool = True) -> bool:
    """Progress bars are drawn on the main process, when asked for, and only on an interactive terminal:
    in a log file they would be noise."""
    return requested and is_main_process and sys.stderr.isatty()


class WarnOnce:
    """Warnings said once per kind of trouble (a key), however often it recurs: a hook that cannot do its
    job at every evaluation should say so once, not fill the log."""

    def __init__(self) -> None:
        self.said: set[str] = set()

    def __call__(self, key: str, message: str) -> None:
        if key not in self.said:
            self.said.add(key)
            warnings.warn(message, stacklevel=3)
