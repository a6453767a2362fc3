"""The ``moekit`` command: ``demo`` (default), ``bench``, ``tune``, ``inspect``."""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommands implemented elsewhere; each parses its own arguments
FORWARDED = {
    "bench": ("moekit.bench", "main", "benchmark whole MoE layers on a GPU (CUDA graphs, roofline, plot)"),
    "tune": ("moekit.tuning", "tune_main", "tune Triton kernel configs for your shape and write a JSON config"),
    "inspect": ("moekit.loading.inspect", "inspect_main", "print the MoE layout of a HF checkpoint directory"),
}


def _demo(args) -> int:
    from .demo import run_demo

    return 0 if run_demo(device=args.device, dtype=args.dtype, repeats=args.repeats) else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moekit", description="Mixture-of-Experts layers for PyTorch.")
    sub = p.add_subparsers(dest="command")
    d = sub.add_parser("demo", help="run two small LongCat-Flash / DeepSeek-V3 shaped layers and check them")
    d.add_argument("--device", default=None, help="cpu or cuda (default: the best available)")
    d.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    d.add_argument("--repeats", type=int, default=5)
    for name, (_, _, text) in FORWARDED.items():
        sub.add_parser(name, help=text + f" (see `moekit {name} --help`)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in FORWARDED:
        module, func, _ = FORWARDED[argv[0]]
        return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
    args = build_parser().parse_args(argv or ["demo"])
    return _demo(args)


if __name__ == "__main__":
    sys.exit(main())
