"""The ``moekit`` command: ``demo`` (default), ``bench``, ``tune``, ``inspect``."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from .demo import run_demo

    return 0 if run_demo(device=args.device, dtype=args.dtype, repeats=args.repeats) else 1


def _forward(module: str, func: str):
    """A subcommand implemented elsewhere that parses its own arguments."""

    def run(args) -> int:
        import importlib

        return int(getattr(importlib.import_module(module), func)(args.rest) or 0)

    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moekit", description="Mixture-of-Experts layers for PyTorch.")
    sub = p.add_subparsers(dest="command")
    d = sub.add_parser("demo", help="run two small LongCat-Flash / DeepSeek-V3 shaped layers and check them")
    d.add_argument("--device", default=None, help="cpu or cuda (default: the best available)")
    d.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    d.add_argument("--repeats", type=int, default=5)
    d.set_defaults(run=_demo)
    for name, module, func, text in (
        ("bench", "moekit.bench", "main", "benchmark whole MoE layers on a GPU (CUDA graphs, roofline, plot)"),
        ("tune", "moekit.tuning", "tune_main", "tune Triton kernel configs for your shape and write a JSON config"),
        ("inspect", "moekit.loading.inspect", "inspect_main", "print the MoE layout of a HF checkpoint directory"),
    ):
        s = sub.add_parser(name, help=text, add_help=False)
        s.add_argument("rest", nargs=argparse.REMAINDER)
        s.set_defaults(run=_forward(module, func))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        args = build_parser().parse_args(["demo"])
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
