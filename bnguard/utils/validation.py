"""Argument checks shared by every public entry point, so that each bad value fails the same way."""

from __future__ import annotations

from numbers import Integral, Real
from typing import Any


def positive_int(name: str, value: Any, *, optional: bool = False) -> int | None:
    """``value`` as an ``int`` if it is a positive integer (or None when ``optional``); raises otherwise.

    NumPy integers pass; ``bool`` does not, although it is an ``int``: ``True`` as a count is a mistake.
    """
    if value is None and optional:
        return None
    wanted = "a positive integer" + (" or None" if optional else "")
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be {wanted}, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be {wanted}, got {value}")
    return int(value)


def fraction(name: str, value: Any, *, optional: bool = False) -> float | None:
    """``value`` as a ``float`` if it is a number in (0, 1] (or None when ``optional``); raises otherwise."""
    if value is None and optional:
        return None
    wanted = "a number in (0, 1]" + (" or None" if optional else "")
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be {wanted}, got {type(value).__name__} {value!r}")
    if not 0 < value <= 1:  # NaN fails too
        raise ValueError(f"{name} must be {wanted}, got {value}")
    return float(value)
