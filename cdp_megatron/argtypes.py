"""argparse types shared by the command-line tools (standard library only)."""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["is_number", "positive_float", "nonneg_int", "positive_int", "join_negative_values", "output_file_problem",
           "output_dir_problem"]


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


def _cannot_write_in(folder: Path) -> str | None:
    """Why nothing can be created in the existing folder ``folder`` (its strerror), or None.

    Tried for real (a temporary folder made and removed at once), not with ``os.access``: that
    says yes to root on a read-only mount or in /proc, and a run that trains for hours before
    its first write would then lose everything at the end."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".cdp-write-check-", dir=folder))
    except OSError as e:
        return e.strerror or str(e)
    return None


def output_file_problem(flag: str, path: str | Path, example: str, *, make_parents: bool = False) -> str | None:
    """Why ``flag path`` cannot be written later (a folder; a folder that does not exist, or
    with ``make_parents`` cannot be made; one that cannot be written in), as one line with the
    fix, or None. Leaves nothing behind; checked before long work starts."""
    target = Path(path)
    if not str(path):
        return f"{flag}: empty path; give a file name, e.g. {example}"
    if target.is_dir():
        return f"{flag} {path}: is a folder; give a file name, e.g. {example}"
    if make_parents:
        return _folder_problem(flag, path, target.parent)
    if not target.parent.is_dir():
        return f"{flag} {path}: folder {target.parent} does not exist; create it first"
    return _folder_problem(flag, path, target.parent)


def output_dir_problem(flag: str, path: str | Path) -> str | None:
    """Why the folder ``flag path`` (made later with its missing parents) cannot be made or
    written in, as one line with the fix, or None. Leaves nothing behind; checked before long
    work starts."""
    target = Path(path)
    if not str(path):
        return f"{flag}: empty path; give a folder"
    if target.exists() and not target.is_dir():
        return f"{flag} {path}: exists and is not a folder; give a folder"
    return _folder_problem(flag, path, target)


def _folder_problem(flag: str, path: str | Path, folder: Path) -> str | None:
    nearest = folder
    while not nearest.exists():  # the nearest existing folder above: the one made in first
        nearest = nearest.parent
    if not nearest.is_dir():
        return f"{flag} {path}: {nearest} is a file, not a folder; choose another path"
    why = _cannot_write_in(nearest)
    if why:
        return f"{flag} {path}: cannot create files in {nearest} ({why}); check the permissions or choose another folder"
    return None
