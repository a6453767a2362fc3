"""Per-kernel statistics of compiled sm_90 Triton kernels: layout conversions, shared memory, main-loop size, spills.

Reads a folder of ``<tag>.ttgir`` / ``<tag>.ptx`` (as ``benchmarks/compile_sm90.py --dump DIR`` writes them) and
prints one row per kernel::

    python benchmarks/ir_stats.py /tmp/ir                       # every kernel dumped there
    python benchmarks/ir_stats.py /tmp/ir --match mxfp4_deepseek  # tags containing a substring
    python benchmarks/ir_stats.py /tmp/ir --compile --fmt mxfp4,int4_g32 --shape deepseek --t 1,1000
        # compile first (compile_sm90's launches; also writes <tag>.json with Triton's metadata: shared bytes)

Columns:

- ``cvt`` / ``alloc`` / ``lstore`` / ``lload``: ``ttg.convert_layout``, ``ttg.local_alloc``, ``ttg.local_store``,
  ``ttg.local_load`` in the TTGIR, ``whole (in the main loop)``; the main loop is the ``scf.for`` holding the dot.
- ``dot``: the dot instruction of the PTX (``wgmma`` / ``mma`` and its shape).
- ``ptx_loop`` / ``sass_loop``: instructions in the innermost loop holding the dot, in the PTX and in the SASS
  (``ptxas`` + ``cuobjdump`` shipped with Triton; the SASS body of a software-pipelined loop is one K step).
- ``shfl`` / ``lds`` / ``sts`` / ``cvt.*``: shuffles, shared loads/stores and conversions in the SASS loop
  (``cvt`` counts F2F/F2FP/I2F conversions).
- ``regs`` / ``spill``: ptxas's registers per thread and spill stores+loads in bytes; ``ld.local``: PTX local
  loads+stores (spills appear only after ptxas, so mostly 0).
- ``smem``: Triton's shared-memory bytes (``<tag>.json`` from ``--compile``; else ``-``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

TRITON_BIN = None


def _bin(name: str) -> str:
    global TRITON_BIN
    if TRITON_BIN is None:
        import triton

        TRITON_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return str(TRITON_BIN / name)


def _loop_span(lines, is_label, target_of, has_dot):
    """(start, end) of the innermost backward-branch loop whose body holds a dot; None when none does."""
    labels = {}
    for i, ln in enumerate(lines):
        lab = is_label(ln)
        if lab is not None:
            labels[lab] = i
    best = None
    for i, ln in enumerate(lines):
        tgt = target_of(ln)
        if tgt is None or tgt not in labels or labels[tgt] >= i:
            continue
        lo = labels[tgt]
        if any(has_dot(x) for x in lines[lo:i + 1]) and (best is None or i - lo < best[1] - best[0]):
            best = (lo, i)
    return best


def ttgir_stats(text: str) -> dict:
    lines = text.splitlines()
    ops = {"cvt": "ttg.convert_layout", "alloc": "ttg.local_alloc", "lstore": "ttg.local_store",
           "lload": "ttg.local_load"}
    whole = {k: sum(v in ln for ln in lines) for k, v in ops.items()}
    # the scf.for regions, by brace depth; the innermost one holding a dot
    loop = None
    stack = []
    depth = 0
    for i, ln in enumerate(lines):
        code = ln.split("//")[0]
        if "scf.for" in code and code.rstrip().endswith("{"):
            stack.append((i, depth))
        depth += code.count("{") - code.count("}")
        while stack and depth <= stack[-1][1]:
            lo, _ = stack.pop()
            body = lines[lo:i + 1]
            if any("tt.dot" in x or "warp_group_dot" in x for x in body) and (loop is None or i - lo < loop[1] - loop[0]):
                loop = (lo, i)
    inner = {k: (sum(v in ln for ln in lines[loop[0]:loop[1] + 1]) if loop else 0) for k, v in ops.items()}
    return {k: f"{whole[k]}({inner[k]})" for k in ops}


def _ptx_instrs(lines):
    """Instruction lines (declarations and comments left out)."""
    return [s for s in (ln.strip() for ln in lines) if s.endswith(";") and not s.startswith((".", "//"))]


def ptx_stats(text: str) -> dict:
    lines = text.splitlines()
    span = _loop_span(
        lines,
        lambda ln: (m.group(1) if (m := re.match(r"^(\$L__\w+):", ln)) else None),
        lambda ln: (m.group(1) if (m := re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+)\s*;", ln)) else None),
        lambda ln: "mma" in ln,
    )
    body = lines[span[0]:span[1] + 1] if span else []
    dot = "-"
    for ln in lines:
        m = re.search(r"\b(wgmma\.mma_async\S*|mma\.sync\S*)", ln)
        if m:
            name = m.group(1)
            dot = ("wgmma." + re.search(r"m\d+n\d+k\d+", name).group(0)) if name.startswith("wgmma") else \
                ("mma." + re.search(r"m\d+n\d+k\d+", name).group(0))
            break
    local = sum(bool(re.search(r"\b(ld|st)\.local", ln)) for ln in lines)
    return {"dot": dot, "ptx_loop": len(_ptx_instrs(body)), "ld.local": local}


def sass_stats(ptx_path: Path) -> dict:
    with tempfile.TemporaryDirectory() as td:
        cubin = os.path.join(td, "k.cubin")
        r = subprocess.run([_bin("ptxas"), "-v", "--gpu-name", "sm_90a", "-lineinfo", str(ptx_path), "-o", cubin],
                           capture_output=True, text=True)
        info = r.stdout + r.stderr
        if r.returncode:
            return {"regs": "ERR", "spill": "ERR"}
        regs = re.search(r"Used (\d+) registers", info)
        st = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
        sass = subprocess.run([_bin("cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
    lines = [ln for ln in sass.splitlines() if re.match(r"^\s+/\*[0-9a-f]{4,}\*/", ln)]

    def addr(ln):
        return int(re.match(r"^\s+/\*([0-9a-f]+)\*/", ln).group(1), 16)

    addrs = {addr(ln): i for i, ln in enumerate(lines)}
    span = _loop_span(
        lines,
        lambda ln: addr(ln),
        lambda ln: (int(m.group(1), 16) if (m := re.search(r"\bBRA(?:\.\w+)*\s+.*?(0x[0-9a-f]+)", ln)) else None),
        lambda ln: re.search(r"\bH(G)?MMA\b|\bHGMMA\.|\bHMMA\.", ln) is not None,
    ) if addrs else None
    body = lines[span[0]:span[1] + 1] if span else []

    def cnt(pat):
        return sum(bool(re.search(pat, ln)) for ln in body)

    return {"regs": int(regs.group(1)) if regs else "?",
            "spill": (int(st.group(1)) + int(st.group(2))) if st else "?",
            "sass_loop": len(body), "shfl": cnt(r"\bSHFL\."), "lds": cnt(r"\bLDS(M)?\b|\bLDS(M)?\."),
            "sts": cnt(r"\bSTS\b|\bSTS\."), "cvt": cnt(r"\b(F2F|F2FP|I2F|I2FP)\b|\b(F2F|F2FP|I2F|I2FP)\.")}


COLS = ["cvt", "alloc", "lstore", "lload", "dot", "ptx_loop", "sass_loop", "shfl", "lds", "sts", "cvt.sass", "regs",
        "spill", "ld.local", "smem"]


def stats(d: Path, tag: str) -> dict:
    row = {}
    tt = d / f"{tag}.ttgir"
    if tt.exists():
        row.update(ttgir_stats(tt.read_text()))
    px = d / f"{tag}.ptx"
    if px.exists():
        row.update(ptx_stats(px.read_text()))
        s = sass_stats(px)
        s["cvt.sass"] = s.pop("cvt", "-")
        row.update(s)
    js = d / f"{tag}.json"
    row["smem"] = json.loads(js.read_text()).get("shared", "-") if js.exists() else "-"
    return row


def compile_into(d: Path, fmts: str, shapes: str, ts: str, kernels: str, patch: dict | None = None,
                 suffix: str = "") -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import compile_sm90 as cs

    d.mkdir(parents=True, exist_ok=True)
    want = set(kernels.split(","))
    for fname in fmts.split(","):
        for shape in shapes.split(","):
            for t in map(int, ts.split(",")):
                for kf, args, kw in cs.launches(cs.FORMATS[fname], t, shape, patch=patch):
                    if kf.__name__ not in want:
                        continue
                    tag = f"{fname}_{shape}_T{t}_{kf.__name__}{suffix}"
                    res = cs.compile_launch(kf, args, kw)
                    for ext in ("ttgir", "ptx"):
                        (d / f"{tag}.{ext}").write_text(res.asm[ext])
                    meta = {"shared": res.metadata.shared, "num_warps": res.metadata.num_warps,
                            **{k: kw.get(k) for k in ("BM", "BN", "BK", "num_stages")}}
                    (d / f"{tag}.json").write_text(json.dumps(meta))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--match", default="", help="only tags containing this substring (comma: any of them)")
    ap.add_argument("--compile", action="store_true", help="compile (compile_sm90 launches) into DIR first")
    ap.add_argument("--fmt", default="mxfp4,int4_g32")
    ap.add_argument("--shape", default="deepseek,gpt-oss")
    ap.add_argument("--t", default="1,64,1000")
    ap.add_argument("--kernels", default="w13_kernel,w2_kernel")
    ap.add_argument("--patch", default=None, help='JSON merged into each config, e.g. \'{"w2": {"SWAP": 1}}\'')
    ap.add_argument("--suffix", default="", help="appended to the tags of this compile (e.g. _swap)")
    a = ap.parse_args(argv)
    d = Path(a.dir)
    if a.compile:
        if os.environ.get("TRITON_INTERPRET") == "1":
            sys.exit("ir_stats --compile: unset TRITON_INTERPRET")
        compile_into(d, a.fmt, a.shape, a.t, a.kernels, json.loads(a.patch) if a.patch else None, a.suffix)
    pats = [p for p in a.match.split(",") if p]
    tags = sorted({p.stem for p in d.glob("*.ptx")} | {p.stem for p in d.glob("*.ttgir")})
    tags = [t for t in tags if not pats or any(p in t for p in pats)]
    rows = [(t, stats(d, t)) for t in tags]
    w = max([len(t) for t in tags] + [3])
    print(f"{'tag':<{w}} " + " ".join(f"{c:>9}" for c in COLS))
    for t, r in rows:
        print(f"{t:<{w}} " + " ".join(f"{str(r.get(c, '-')):>9}" for c in COLS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
