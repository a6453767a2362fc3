"""The ``moekit`` command: one argparse parser with the subcommands ``demo``, ``bench``, ``tune``, ``inspect``.

    moekit demo [--device cpu|cuda|cuda:N] [--dtype ...] [--repeats N]
    moekit bench [--models ...] [--tokens ...] [--quant bf16,fp8,mxfp4,int4] [--fast] [--eager] [--out DIR]
    moekit tune (--models ... | --points MODEL:T,... | -E E -H H -I I -K K) [--out DIR]
    moekit inspect CHECKPOINT_DIR
    moekit --version          python -m moekit ...  (the same command)

Decisions (issue #12):

- A bare ``moekit`` prints the help to stderr and exits 2, like argparse for a missing required
  argument. It does not run the demo (a mistyped script would silently do work), and exit 0 would
  hide the mistake from the shell.
- Exit codes: 0 success; 1 the command ran and failed (a demo check failed, ``bench``/``tune`` found
  no CUDA GPU, or a file, a config file or GPU memory failed them; any command whose stdout cannot be
  written, ``> /dev/full``); 2 the command line is wrong; 130
  interrupted; 141 the reader of stdout left (``| head``). Errors go to stderr as one line,
  ``moekit SUB: error: argument --OPTION: what was expected, got VALUE``, without a traceback.
- Where results go: ``bench`` writes ``<gpu>-<date>.json`` (and ``.png``) to ``--out``, by default
  ``./benchmarks/results`` when that folder exists, else the current folder. ``tune`` merges its
  configs into ``<out>/<gpu>.json``, by default ``$MOEKIT_CONFIG_DIR`` when set, else
  ``~/.cache/moekit/configs``: the first places the kernel-config lookup searches, so a tuned config
  is used without further steps.
- ``inspect`` parses its own arguments: everything after ``inspect`` goes to
  :func:`moekit.loading.inspect.inspect_main` untouched.
- ``--version`` reads the installed distribution's version, falling back to ``moekit.__version__``
  (a source tree on ``PYTHONPATH``); both come from the one ``__version__`` in ``moekit/__init__.py``
  (``pyproject.toml`` reads it).
"""

from __future__ import annotations

import argparse
import sys

import torch

from ._argparse import (OneLineParser, fraction, int_list, non_negative_float, positive_float, positive_int,
                        reader_left, stdout_failed, unwritable_folder)
from ._checks import DTYPE_SHORT, check_device
from .benchmarking.cli_args import model_list, point_list
from .ops.triton_configs import ConfigFileError

DTYPES = ("bfloat16", "float16", "float32")


def package_version() -> str:
    """The installed distribution's version (``importlib.metadata``), falling back to ``moekit.__version__``.

    When both exist and differ, a source tree on ``PYTHONPATH`` shadows another install: the version of
    the code that runs (``__version__``) is the true one."""
    from importlib.metadata import PackageNotFoundError, version

    import moekit

    running = getattr(moekit, "__version__", None)
    try:
        installed = version("moekit")
    except PackageNotFoundError:
        installed = None
    if installed is None or (running is not None and running != installed):
        return running or "unknown"
    return installed


def device(text: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``, and runnable here."""
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    try:  # runnable here: the library's own device check (its message in the command line's words: round 65)
        return check_device("--device", text)
    except ValueError as err:
        why = str(err).split(": ", 1)[-1].split("; use ")[0]
        raise argparse.ArgumentTypeError(
            f"expected cpu, or a visible CUDA device, got {text!r} ({why}; use --device cpu)") from None


# -- subcommands ---------------------------------------------------------------------------------
def _needs_cuda(name: str) -> bool:
    if torch.cuda.is_available():
        return True
    print(f"moekit {name}: error: needs a CUDA GPU (it times CUDA graphs of the Triton kernels); "
          "torch.cuda.is_available() is False here (`moekit demo` runs and times small layers on the CPU)",
          file=sys.stderr)
    return False


def _run_demo(args, parser) -> int:
    from .demo import run_demo

    dev = None if args.device is None else str(args.device)
    return 0 if run_demo(device=dev, dtype=args.dtype, repeats=args.repeats) else 1


def _check_out(parser, out, default, default_text: str) -> None:
    """``--out`` (or its default): a folder that is or can be made, checked before a run writes into it."""
    why = unwritable_folder(default if out is None else out)
    if why:
        parser.error(f"argument --out: {why}" + ("" if out else f" (the default: {default_text})"))


def _run_bench(args, parser) -> int:
    from .benchmarking.bench import check_quants, default_out, default_reference, run_bench
    from .benchmarking.plot import load_reference
    from .benchmarking.shapes import TOKENS

    dtype = getattr(torch, args.dtype)
    try:
        quants = check_quants(args.quant, dtype)
    except ValueError as err:
        parser.error(f"argument {err}")
    if args.eager_only and args.reference is not None:  # (round 67: accepted, drawn nowhere: no eager row is plotted)
        parser.error(f"argument --reference: does not apply with --eager-only (its rows are drawn in no plot), got "
                     f"{args.reference!r}")
    reference = None if args.eager_only else default_reference() if args.reference is None else args.reference
    try:  # read at the end of a run (the speed plot): a missing or bad file is refused before the run
        load_reference(reference)
    except (OSError, ValueError) as err:
        parser.error(f"argument --reference: expected a baseline JSON file, got {str(reference)!r} ({err})")
    _check_out(parser, args.out, default_out(), "./benchmarks/results or .")
    if args.eager_tokens is not None and not (args.eager or args.eager_only):
        parser.error("argument --eager-tokens: applies with --eager or --eager-only")
    if args.eager_only and args.tokens is not None:  # (the eager rows run at --eager-tokens; they were ignored)
        parser.error(f"argument --tokens: does not apply with --eager-only (its rows run at --eager-tokens), got "
                     f"{','.join(map(str, args.tokens))!r}")
    if args.eager_only and len(quants) > 1:  # (the eager rows time the unquantised layer)
        parser.error(f"argument --quant: does not apply with --eager-only (unquantised rows), got {args.quant!r}")
    if args.eager_only:  # (round 65: accepted and ignored; the eager rows time 4 rotations, 10 ms graphs, no settle)
        given = [f"{o} {v}" for o, v, d in (("--rotations", args.rotations, 4), ("--settle-ms", args.settle_ms, 1000.0))
                 if v != d] + (["--fast"] if args.fast else [])
        if given:
            parser.error(f"argument {given[0].split()[0]}: does not apply with --eager-only (its rows use fixed "
                         f"timing: 4 rotations, no settle), got {', '.join(given)}")
    if not _needs_cuda("bench"):
        return 1
    eager = (args.eager_tokens or [1, 8, 64]) if (args.eager or args.eager_only) else ()
    tokens = [] if args.eager_only else list(TOKENS) if args.tokens is None else args.tokens
    run_bench(args.models, tokens, dtype, rotations=args.rotations,
              baseline=not args.no_baseline, routing=not args.no_routing and not args.eager_only,
              longcat_nozero=not args.no_longcat_nozero and not args.eager_only, out=args.out,
              log=lambda s: print(s, flush=True), quant=quants, eager_tokens=eager,
              experts=not args.no_experts, fast=args.fast, reference=reference, settle_ms=args.settle_ms)
    return 0


def _run_tune(args, parser) -> int:
    from .benchmarking.shapes import TOKENS, ModelShape
    from .benchmarking.tune import default_out, run_tune

    shape = (args.experts, args.hidden, args.inter, args.top_k)
    given = [args.models is not None, args.points is not None, any(v is not None for v in shape)]
    if sum(given) != 1 or (given[2] and None in shape):
        parser.error("give one of --models, --points, or all of --experts --hidden --inter --top-k")
    if not given[2] and (args.activation is not None or args.has_bias):
        parser.error("--activation and --has-bias apply to a shape of your own (-E -H -I -K)")
    if given[2] and args.top_k > args.experts:
        parser.error(f"argument --top-k: expected at most --experts ({args.experts}), got {args.top_k}")
    if args.points is not None:
        if args.tokens is not None:  # (was ignored: each point names its token counts)
            parser.error(f"argument --tokens: does not apply with --points (each point names its tokens, MODEL:T), "
                         f"got {','.join(map(str, args.tokens))!r}")
        targets = args.points
    else:
        models = args.models or [ModelShape("custom", E=shape[0], K=shape[3], H=shape[1], I=shape[2],
                                            act=args.activation or "silu", has_bias=args.has_bias)]
        targets = [(m, list(TOKENS) if args.tokens is None else args.tokens) for m in models]
    dtype = getattr(torch, args.dtype)
    quant = _tune_quant(args.quant, dtype, parser)
    if args.block_k is not None and quant is not None:
        parser.error(f"--block-k applies to unquantised shapes (--quant {quant} fixes BLOCK_K)")
    if quant is not None and given[2]:
        from .benchmarking.bench_quant import QUANT_FORMATS

        try:
            QUANT_FORMATS[quant].validate(args.experts, args.inter, args.hidden, targets[0][0].gated)
        except ValueError as err:
            parser.error(f"argument --quant: {err}")
    _check_out(parser, args.out, default_out(), "$MOEKIT_CONFIG_DIR or ~/.cache/moekit/configs")
    if not _needs_cuda("tune"):
        return 1
    budget = args.budget_s if args.budget_s is not None else (45.0 if args.quick else 150.0)
    rotations = args.rotations if args.rotations is not None else (2 if args.quick else 4)
    lines = []

    def log(s: str) -> None:
        lines.append(s)
        print(s, flush=True)

    kw = dict(out=args.out, budget_s=budget, pdl=args.pdl, min_gain=args.min_gain, rotations=rotations, quant=quant,
              quick=args.quick, log=log)
    if args.block_k == "auto":
        from .benchmarking.tune_auto import run_tune_auto

        run_tune_auto(targets, dtype, **kw)
    else:
        run_tune(targets, dtype, force_block_k=args.block_k, **kw)
    return 1 if any(s.startswith("nothing tuned") for s in lines) else 0  # (every shape skipped: say so in the status)


def _block_k_arg(s: str):
    """``--block-k``: an int, or "auto" as it is (argparse's ``choices`` then names the valid values)."""
    if s == "auto" or s.isdigit():
        return s if s == "auto" else int(s)
    raise argparse.ArgumentTypeError(f"expected 32, 64, 128 or 'auto', got {s!r}")


def _tune_quant(quant: str | None, dtype: torch.dtype, parser) -> str | None:
    """``--quant`` of ``tune``: None for the unquantised dtype (its short name is accepted too), else a
    quantised format of the benchmark (16-bit activations only)."""
    from .benchmarking.bench_quant import QUANT_FORMATS

    short = DTYPE_SHORT[dtype]
    if quant is None or quant == short:
        return None
    if quant not in QUANT_FORMATS:
        parser.error(f"argument --quant: expected {short!r} (the --dtype) or one of {', '.join(QUANT_FORMATS)}, "
                     f"got {quant!r}")
    if dtype == torch.float32:
        parser.error(f"argument --quant: {quant} runs with 16-bit activations; use --dtype bfloat16 or float16")
    return quant


def _run_inspect(args, parser) -> int:
    from .loading.inspect import inspect_main

    # its errors are one line (a malformed config.json value included); a failing stdout is main's (round 67: this
    # catch-all blamed it on config.json)
    return int(inspect_main(args.rest) or 0)


# -- the parser ----------------------------------------------------------------------------------
def _add_demo(sub) -> None:
    d = sub.add_parser("demo", help="run two small LongCat-Flash / DeepSeek-V3 shaped layers and check them",
                       description="Build two small layers, check them against a float64 reference, time them.")
    d.add_argument("--device", type=device, default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    d.add_argument("--dtype", default=None, choices=DTYPES,
                   help="parameter and activation dtype (default: bfloat16 on cuda, float32 on cpu)")
    d.add_argument("--repeats", type=positive_int, default=5, help="timed calls per layer, >= 1 (default: 5)")
    d.set_defaults(run=_run_demo)


def _add_bench(sub) -> None:
    from .benchmarking.bench import QUANT_DTYPES, QUANT_FORMATS
    from .benchmarking.shapes import EXTRA_MODELS, MODELS, TOKENS

    b = sub.add_parser("bench", help="benchmark whole MoE layers on a CUDA GPU (CUDA graphs, roofline, plot)",
                       description="Time moekit's layer forward and its experts step, per weight format, against "
                                   "a torch._grouped_mm MoE, per model shape and token count; write "
                                   "<gpu>-<date>.json, .png (roofline) and -speed.png.")
    b.add_argument("--models", type=model_list, default=list(MODELS.values()),
                   help=f"comma-separated model shapes or 'all' (default: all): {', '.join(MODELS)}; "
                   f"also {', '.join(EXTRA_MODELS)}")
    b.add_argument("--tokens", type=int_list, default=None,
                   help=f"comma-separated token counts (default: {','.join(map(str, TOKENS))}; not with --eager-only, "
                        "whose rows run at --eager-tokens)")
    b.add_argument("--dtype", default="bfloat16", choices=DTYPES[:2], help="weight and activation dtype")
    b.add_argument("--quant", default=None,
                   help=f"comma-separated weight formats timed side by side: the unquantised --dtype "
                        f"({' or '.join(QUANT_DTYPES)}, always timed; the default alone) and any of "
                        f"{', '.join(QUANT_FORMATS)} (weights quantised once per layer; fp8 = 128x128 blocks, "
                        "int4 = group 32); rows carry 'quant', e.g. --quant bf16,fp8,mxfp4,int4")
    b.add_argument("--rotations", type=positive_int, default=4,
                   help="input sets rotated inside the CUDA graph, so weights are not served from L2 (default: 4)")
    b.add_argument("--no-baseline", action="store_true", help="skip the torch._grouped_mm baseline")
    b.add_argument("--no-routing", action="store_true", help="skip the routing-kernel benchmark")
    b.add_argument("--no-experts", action="store_true",
                   help="skip the experts-step rows (impl 'moekit-experts': fused_experts on precomputed routing)")
    b.add_argument("--fast", action="store_true",
                   help="short timing (10 ms graph replays, median of 5) and no baseline, routing or "
                        "LongCat-without-zero rows")
    b.add_argument("--settle-ms", type=non_negative_float, default=1000.0,
                   help="warm-up of a compute-heavy row (>= 1 ms per call) before its timing, so that it is timed at "
                        "the clocks a GPU at its power cap settles to (default: 1000; 0: the 200 ms of light rows)")
    b.add_argument("--reference", default=None,
                   help="baseline JSON of a peer's numbers drawn in the speed plot (default: "
                        "./benchmarks/baselines/vllm-h200.json if it exists)")
    b.add_argument("--no-longcat-nozero", action="store_true",
                   help="skip LongCat-Flash without zero experts (run after longcat-flash by default)")
    b.add_argument("--eager", action="store_true",
                   help="also time eager calls: host enqueue us per call vs the GPU us of the same call "
                        "(router, fused_experts, layer with and without its internal graph, one F.linear)")
    b.add_argument("--eager-only", action="store_true", help="only the --eager rows")
    b.add_argument("--eager-tokens", type=int_list, default=None,
                   help="token counts of the --eager / --eager-only rows (default: 1,8,64)")
    b.add_argument("--out", default=None,
                   help="folder for the JSON and PNG (default: ./benchmarks/results if it exists, else .)")
    b.set_defaults(run=_run_bench)


def _add_tune(sub) -> None:
    from .benchmarking.shapes import EXTRA_MODELS, MODELS, TOKENS
    from .ops.activation import ACTIVATIONS

    t = sub.add_parser("tune", help="tune Triton kernel configs on a CUDA GPU and store them where lookups find them",
                       description="Search kernel configs of the Triton experts for model shapes and merge the "
                                   "winners into <out>/<gpu>.json, where the config lookup finds them.")
    t.add_argument("--models", type=model_list, default=None,
                   help=f"comma-separated model shapes or 'all': {', '.join(MODELS)}; also {', '.join(EXTRA_MODELS)}")
    t.add_argument("--points", type=point_list, default=None,
                   help="targeted points MODEL:TOKENS, comma-separated (e.g. qwen3-30b-a3b:1,gpt-oss-120b:1024; all:1: "
                        "every benchmark shape at T = 1)")
    t.add_argument("--experts", "-E", type=positive_int, help="a shape of your own: local experts E")
    t.add_argument("--hidden", "-H", type=positive_int, help="a shape of your own: hidden size H")
    t.add_argument("--inter", "-I", type=positive_int, help="a shape of your own: intermediate size I (per TP shard)")
    t.add_argument("--top-k", "-K", type=positive_int, help="a shape of your own: experts per token K")
    t.add_argument("--activation", default=None, choices=list(ACTIVATIONS),
                   help="with -E/-H/-I/-K: the activation (default: silu)")
    t.add_argument("--has-bias", action="store_true", help="with -E/-H/-I/-K: the experts have biases")
    t.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="weight and activation dtype")
    t.add_argument("--tokens", type=int_list, default=None,
                   help=f"token counts to tune, with --models or -E... (default: {','.join(map(str, TOKENS))})")
    t.add_argument("--pdl", action="store_true",
                   help="also try programmatic dependent launch (sm_90+; kept only if bit-identical)")
    t.add_argument("--min-gain", type=fraction, default=0.015,
                   help="keep a new config only if faster than the one in use by this fraction (default: 0.015)")
    t.add_argument("--quant", default=None,
                   help="weight format to tune: the unquantised --dtype (the default), or fp8 (128x128 blocks), "
                        "mxfp4, int4 (group 32): the quantised kernels, stored under the format's shape key")
    t.add_argument("--quick", action="store_true",
                   help="a CI-sized search: fewer candidates, 2 rotations, 45 s per shape unless --budget-s")
    t.add_argument("--rotations", type=positive_int, default=None,
                   help="routings rotated per timing (default: 4, --quick: 2)")
    t.add_argument("--budget-s", type=positive_float, default=None,
                   help="seconds per shape (default: 150, --quick: 45): each token count gets a share, timing stops "
                        "at it, and token counts reached after the budget keep the config in use")
    t.add_argument("--block-k", type=_block_k_arg, default=None, choices=(32, 64, 128, "auto"),
                   help="unquantised shapes: the one BLOCK_K of all buckets (SPEC §9), e.g. 128 for decode-heavy "
                        "use, or 'auto': the shape tuned once per BLOCK_K the heuristic uses (the budget shared), "
                        "the faster table kept (geometric mean over its buckets); default: what the largest "
                        "bucket's search picks")
    t.add_argument("--out", default=None,
                   help="folder of <gpu>.json (default: $MOEKIT_CONFIG_DIR if set, else ~/.cache/moekit/configs; "
                        "the config lookup searches these first, then the configs shipped with moekit)")
    t.set_defaults(run=_run_tune)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: every subcommand and option."""
    p = OneLineParser(prog="moekit", description="Mixture-of-Experts layers for PyTorch.")
    p.add_argument("--version", action="version", version=f"moekit {package_version()}",
                   help="print moekit's version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    p.subcommands = sub.choices  # name -> its parser (errors are reported by the subcommand's parser)
    _add_demo(sub)
    _add_bench(sub)
    _add_tune(sub)
    i = sub.add_parser("inspect", add_help=False, help="print the MoE layout of a HF checkpoint directory "
                                                       "(see `moekit inspect --help`)")
    i.set_defaults(run=_run_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``moekit ARGS``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        if not argv:
            parser.print_help(sys.stderr)
            return 2
        args, rest = parser.parse_known_args(argv)
        if args.command is None:
            parser.error(f"expected a command (demo, bench, tune or inspect), got {' '.join(rest)!r}")
        sub = parser.subcommands[args.command]
        if args.command != "inspect" and rest:
            sub.error(f"unrecognized arguments: {' '.join(rest)}")
        args.rest = rest
        try:
            return args.run(args, sub)
        except (OSError, ConfigFileError, RuntimeError) as err:  # a file, a config file, GPU memory, a bucket that
            # cannot be tuned here (round 65: tune_checks.BucketNotTuned escaped as a traceback); an OSError of any
            # command (round 67: `moekit demo > /dev/full` was a traceback)
            one_line = isinstance(err, (OSError, ConfigFileError, torch.cuda.OutOfMemoryError)) or \
                type(err).__name__ == "BucketNotTuned"
            if isinstance(err, BrokenPipeError) or not one_line or \
                    (args.command not in ("bench", "tune") and not isinstance(err, OSError)):
                raise
            why = str(err).partition("\n")[0]
            print(f"moekit {args.command}: error: {type(err).__name__}: {why}", file=sys.stderr)
            stdout_failed()
            return 1
    except SystemExit as stop:  # --help, --version and usage errors
        return stop.code if isinstance(stop.code, int) else 1
    except KeyboardInterrupt:
        print("moekit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `moekit ... | head`: the reader left; no traceback, no second error at exit
        return reader_left()


if __name__ == "__main__":
    sys.exit(main())
