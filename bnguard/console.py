"""What bnguard shows in the terminal: progress bars only where a person is watching."""

from __future__ import annotations

import sys


def show_progress(requested: bool, is_main_process: bool = True) -> bool:
    """Progress bars are drawn on the main process, when asked for, and only on an interactive terminal:
    in a log file they would be noise."""
    return requested and is_main_process and sys.stderr.isatty()
