"""argparse types shared by the command-line tools (standard library only)."""

from __future__ import annotations

import argparse
import math

__all__ = ["positive_float", "nonneg_int", "positive_int"]


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive finite number")
    return v


def _whole(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    # int(inf) raises OverflowError, which argparse does not catch
    if not math.isfinite(v) or v != int(v):
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}")
    return v


def nonneg_int(text: str) -> int:
    """A whole number >= 0; '2e3' is accepted as 2000."""
    v = _whole(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return int(v)


def positive_int(text: str) -> int:
    """A whole number >= 1 ('-3' says so, not just '>= 0')."""
    v = _whole(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return int(v)
