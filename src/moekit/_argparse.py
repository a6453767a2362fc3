"""The ``moekit`` commands' argument parser (``moekit`` and ``moekit inspect`` share it), its value types, and the
check of an output folder (``moekit bench`` / ``tune`` and the scripts of ``benchmarks/`` use them).

Each value type raises ``argparse.ArgumentTypeError`` saying what was expected and what was given, so argparse
reports ``PROG: error: argument --OPTION: expected ..., got 'VALUE'`` on one line and exits 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

#: the largest token count a list option takes (int32 indices; a larger one overflowed deep in torch)
MAX_TOKENS = 2**31 - 1


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and the exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _value(text: str, convert, ok, expected: str):
    """``convert(text)`` if that works and passes ``ok``, else an error saying ``expected``."""
    try:
        value = convert(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _value(text, int, lambda v: v >= 1, "an integer >= 1")


def positive_float(text: str) -> float:
    return _value(text, float, lambda v: 0 < v < math.inf, "a finite number > 0")


def non_negative_float(text: str) -> float:
    return _value(text, float, lambda v: 0 <= v < math.inf, "a finite number >= 0")


def fraction(text: str) -> float:
    return _value(text, float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")


def split_list(text: str) -> list[str]:
    """The items of a comma list, stripped; an empty item (``1,,2``, a trailing comma) gives ``[]``."""
    items = [v.strip() for v in text.split(",")]
    return [] if "" in items else items


def int_list(text: str) -> list[int]:
    """Comma-separated integers in [1, :data:`MAX_TOKENS`], e.g. token counts; each once, in first-seen order (a
    token count given twice was timed twice)."""
    try:
        values = [int(v) for v in split_list(text)]
    except ValueError:
        values = []
    if not values or min(values) < 1 or max(values) > MAX_TOKENS:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1 (at most {MAX_TOKENS}), "
                                         f"got {text!r}")
    return list(dict.fromkeys(values))


def choice_list(choices, what: str = "names"):
    """A value type: comma-separated names out of ``choices`` (a list of them, in the given order)."""
    def parse(text: str) -> list[str]:
        names = split_list(text)
        if not names or any(n not in choices for n in names):
            raise argparse.ArgumentTypeError(f"expected comma-separated {what} from {', '.join(choices)}, "
                                             f"got {text!r}")
        return names
    return parse


def unwritable_folder(path) -> str | None:
    """Why files cannot be written into the folder ``path`` (made with its parents where missing), or None."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        return f"{str(path)!r} is a file, not a folder"
    while not p.exists() and p.parent != p:  # the nearest existing folder, where the missing ones would be made
        p = p.parent
    if not p.is_dir():
        return f"{str(path)!r} cannot be made: {str(p)!r} is a file, not a folder"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"{str(path)!r} is not writable ({str(p)!r} does not let this user write)"
    return None


def out_file(text: str) -> str:
    """A value type: a file to write, in an existing writable folder (checked before a run, not after it)."""
    p = Path(text)
    why = f"{text!r} is a folder" if p.is_dir() else None
    if why is None and not p.parent.is_dir():
        why = f"the folder {str(p.parent)!r} does not exist"
    why = why or unwritable_folder(p.parent)
    if why:
        raise argparse.ArgumentTypeError(f"expected a file path in a writable folder, got {text!r} ({why})")
    return text


def reader_left() -> int:
    """After a ``BrokenPipeError`` on stdout (``... | head``: the reader left): stdout to the null device, so that
    nothing raises again at exit, and the shell's status for it, 141 (``moekit`` and the ``benchmarks/`` scripts)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # a stdout without a file descriptor (captured)
        pass
    return 141


def stdout_failed() -> None:
    """After a command's ``OSError``: where stdout itself cannot be written (``> /dev/full``), stdout to the null
    device, so that the flush at exit does not raise again (round 67: a second error, and status 120)."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        reader_left()  # (its redirection; not its status)
