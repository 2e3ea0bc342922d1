"""argparse types shared by the command-line tools (standard library only)."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Callable

__all__ = ["is_number", "positive_float", "nonneg_int", "positive_int", "join_negative_values", "output_file_problem"]


def is_number(text: str) -> bool:
    """Whether float() reads ``text`` ("1e-3", "-inf" and "nan" included)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


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


def join_negative_values(argv: list[str], takes_number: Callable[[str], bool], is_negative: Callable[[str], bool]) -> list[str]:
    """``FLAG -X`` -> ``FLAG=-X`` where FLAG takes a number and -X is a negative one.

    argparse reads "-inf", "-1e-3" or "-2x" (unlike "-2") as an option and says only
    "expected one argument"; attached to its flag the value reaches the flag's own check,
    which says what is wrong. Nothing after a bare ``--`` is touched.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return out + argv[i:]
        if takes_number(arg) and i + 1 < len(argv) and argv[i + 1].startswith("-") and is_negative(argv[i + 1]):
            out.append(f"{arg}={argv[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def output_file_problem(flag: str, path: str | Path, example: str) -> str | None:
    """Why ``flag path`` cannot be written later (a folder; a folder that does not exist or
    is not writable), as one line with the fix, or None. Checked before long work starts."""
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        return f"{flag} {path}: is a folder; give a file name, e.g. {example}"
    if not folder.is_dir():
        return f"{flag} {path}: folder {folder} does not exist; create it first"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{flag} {path}: folder {folder} is not writable; check the permissions"
    return None
