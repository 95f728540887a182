"""Time spent inside an object's methods, for benchmarks that measure an adapter's or a guard's own cost."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any


class Stopwatch:
    """Wraps the named methods of ``target`` (on the instance) to add up the seconds spent inside them."""

    def __init__(self, target: Any, names: Iterable[str]):
        self.seconds = 0.0
        for name in names:
            setattr(target, name, self._timed(getattr(target, name)))

    def _timed(self, method):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return timed
