"""Value types of ``moekit bench`` / ``moekit tune`` options that name benchmark shapes (:mod:`moekit.cli` uses them).

Each raises ``argparse.ArgumentTypeError`` saying what was expected and what was given. A name or a token count
given twice is kept once, in first-seen order (as ``--quant`` keeps each format once): a duplicate only doubled
the GPU time and the rows of the JSON.
"""

from __future__ import annotations

import argparse

from .._argparse import int_list, split_list
from .shapes import EXTRA_MODELS, MODELS


def model_list(text: str) -> list:
    """``all`` (the benchmark shapes) or names of :data:`MODELS` / :data:`EXTRA_MODELS`, each once."""
    known = {**MODELS, **EXTRA_MODELS}
    names = list(MODELS) if text.strip() == "all" else split_list(text)  # an empty item: an error
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected 'all' or names from {', '.join(known)}, got {text!r}")
    return [known[n] for n in dict.fromkeys(names)]


def point_list(text: str) -> list[tuple]:
    """``MODEL:T,MODEL:T`` -> [(ModelShape, [T, ...]), ...] in first-seen order (``all:T``: every benchmark shape)."""
    targets: dict[str, tuple] = {}
    for item in split_list(text):
        name, _, t = item.partition(":")
        try:
            shapes, tokens = model_list(name), int_list(t)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected MODEL:TOKENS[,MODEL:TOKENS...], got {item!r}") from None
        for shape in shapes:
            point = targets.setdefault(shape.name, (shape, []))[1]
            point.extend(t for t in tokens if t not in point)
    if not targets:
        raise argparse.ArgumentTypeError(f"expected MODEL:TOKENS[,MODEL:TOKENS...], got {text!r}")
    return list(targets.values())
