"""Does a source change alter the compiled sm_90 kernels? Compile the experts' kernel forms for sm_90 on the CPU
(Triton's real compiler, :mod:`compile_sm90`) from two source trees and compare their PTX, line-number records and
debug sections left out (they move with any edit). Covered: the launcher's Triton kernels (align, input quantiser,
w13, w2, sum pass) for five formats, three token counts and three activations (silu; swigluoai with biases;
softcap_swiglu), and sixteen Gluon GEMM forms (five of them the register-operand 4-bit early-refill forms, round
42); since round 45 also four register-operand forms on re-laid words (two with gpt-oss's half chunks) and the Triton
4-bit GEMMs of eight launches on re-laid words. Not covered: the Gluon fp8 decode kernels, the router gate, routing and zero-expert kernels (their compile checks
live in the tests).

    python benchmarks/ptx_diff.py OLD_ROOT NEW_ROOT       # e.g. a `git worktree add /tmp/head HEAD` and .

Each tree compiles in its own process with its own Triton cache. Prints one line per kernel (its PTX hash in each
tree, ``DIFF`` where they differ, ``ERR`` where a tree failed to compile it) and exits 1 if any differs or failed.
Round 40: every form was the same before and after the Triton 3.9 changes, under Triton 3.6. Round 42: one form,
``gluon w4 rega w2``, came out of one source tree in two instruction orders depending on the process that
compiled it (the same instructions, two ``prmt`` groups swapped), so a lone DIFF there needs a look at the PTX itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

# (name, the call of compile_sm90 that returns the CompiledKernel)
GLUON = [
    ("gluon fp8 w2", "c.gluon_fp8_w2()"),
    ("gluon fp8 w2 ws", "c.gluon_fp8_w2_ws()"),
    ("gluon fp8 w13", "c.gluon_fp8_w13()"),
    ("gluon fp8 w13 swigluoai", "c.gluon_fp8_w13(h=2880, i=2880, act='swigluoai', bias=True)"),
    ("gluon fp8 w13 ws", "c.gluon_fp8_w13_ws()"),
    ("gluon w4 w13", "c.gluon_w4('w13')"),
    ("gluon w4 w2", "c.gluon_w4('w2')"),
    ("gluon w4 rega w13", "c.gluon_w4('w13', rega=True)"),
    ("gluon w4 rega w2", "c.gluon_w4('w2', rega=True)"),
    ("gluon w4 rega w13 early", "c.gluon_w4('w13', rega=True, early=True)"),
    ("gluon w4 rega w2 early", "c.gluon_w4('w2', rega=True, early=True)"),
    ("gluon w4 rega w13 early 128x128",
     "c.gluon_w4('w13', rega=True, early=True, bm=128, bn=128, stages=3, sword=True)"),
    ("gluon w4 rega w2 early 128x128", "c.gluon_w4('w2', rega=True, early=True, bm=128, bn=128, stages=3, sword=True)"),
    ("gluon w4 rega w13 early serial int4", "c.gluon_w4('w13', 'int4', rega=True, early=True, serial=True)"),
    ("gluon w4 ws w13", "c.gluon_w4('w13', wspec=(2, 80))"),
    ("gluon w4 ws w2", "c.gluon_w4('w2', wspec=(2, 80))"),
    # round 45: on re-laid words (a layer's storage since round 44), and rows ending in a half chunk (gpt-oss)
    ("gluon w4 rega w13 early relaid", "c.gluon_w4('w13', rega=True, early=True, sword=True, relaid=True)"),
    ("gluon w4 rega w2 early relaid int4", "c.gluon_w4('w2', 'int4', rega=True, early=True, relaid=True)"),
    ("gluon w4 rega w13 early serial relaid half",
     "c.gluon_w4('w13', rega=True, early=True, serial=True, relaid=True, h=2880, i=2880)"),
    ("gluon w4 rega w2 early relaid half int4", "c.gluon_w4('w2', 'int4', rega=True, early=True, relaid=True, "
                                               "h=2880, i=2880)"),
]
# the launcher's Triton kernels: (format, tokens, shape of compile_sm90.SHAPES)
SOFTCAP = (16, 4, 1024, 512, "softcap_swiglu", False)  # (E, K, H, I, activation, bias), as compile_sm90.SHAPES
LAUNCHES = [(f, t, s) for f in ("bf16", "fp8_block", "fp8_channel", "mxfp4", "int4_g32") for t in (1, 64, 1000)
            for s in ("gpt-oss", "deepseek", SOFTCAP)]
# the Triton 4-bit GEMMs of those launches on re-laid words (``RELAID``, round 45)
RELAID = [(f, t, s) for f in ("mxfp4", "int4_g32") for t in (1, 1000) for s in ("gpt-oss", "deepseek")]

CHILD = r"""
import hashlib, re, sys
import compile_sm90 as c
def h(ptx):
    ptx = re.split(r"\.section\s+\.debug", ptx)[0]
    keep = [ln for ln in ptx.split("\n") if not ln.strip().startswith((".loc", ".file", "//"))]
    return hashlib.sha1("\n".join(keep).encode()).hexdigest()[:12]
def show(name, make):
    try:
        print(name, h(make().asm["ptx"]), flush=True)
    except Exception as exc:  # one form failing in a tree: reported, the others still compile
        print(name, "ERR " + type(exc).__name__, flush=True)
for name, call in GLUON:
    show(name, lambda: eval(call))
for fmt, t, shape in LAUNCHES:
    label = shape if isinstance(shape, str) else shape[4]
    for n, (kf, args, kw) in enumerate(c.launches(c.FORMATS[fmt], t, shape)):
        show(f"{fmt} T={t} {label} #{n} {kf.__name__}", lambda: c.compile_launch(kf, args, kw))
for fmt, t, shape in RELAID:
    for n, (kf, args, kw) in enumerate(c.launches(c.FORMATS[fmt], t, shape)):
        if kf.__name__ in ("w13_kernel", "w2_kernel"):
            show(f"relaid {fmt} T={t} {shape} #{n} {kf.__name__}",
                 lambda: c.compile_launch(kf, args, dict(kw, RELAID=True)))
"""


def hashes(root: str) -> dict[str, str]:
    """{kernel: PTX hash} of the tree at ``root``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"GLUON = {GLUON!r}\nLAUNCHES = {LAUNCHES!r}\nRELAID = {RELAID!r}\n" + CHILD
    with tempfile.TemporaryDirectory(prefix="ptx_diff_") as cache:
        env.update(PYTHONPATH=os.pathsep.join([os.path.join(root, "src"), os.path.join(root, "benchmarks")]),
                   TRITON_CACHE_DIR=cache)
        res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{root}: compiling failed\n{res.stderr[-3000:]}")
    line = re.compile(r"^(.+) ([0-9a-f]{12}|ERR \w+)$")
    return {m.group(1): m.group(2) for m in map(line.match, res.stdout.splitlines()) if m}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__)
        return 2
    old, new = hashes(argv[0]), hashes(argv[1])
    differ = 0
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name, "-"), new.get(name, "-")
        differ += a != b or a.startswith("ERR")
        print(f"{name:48s} {a} {b}{'  DIFF' if a != b else ''}")
    print(f"{len(set(old) | set(new))} kernels, {differ} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
