"""Verdicts of a ``moekit bench`` run against the targets of issues #9 (fp8), #10 (4-bit) and #11 (peer, peak, eager).

    python benchmarks/compare.py RESULTS.json [--baseline benchmarks/baselines/vllm-h200.json] [--md OUT.md]
                                 [--plot OUT.png]

RESULTS.json: the rows ``moekit bench`` writes (``--quant bf16,fp8,mxfp4,int4``, optionally ``--eager``).
The baseline file holds the peer's numbers the issues quote (vLLM on an H200). Prints markdown tables,
one per target, and a summary of verdicts (``met`` / ``MISSED``; a target whose points are missing
from the results is ``MISSED`` with the count of missing points). Which rows are compared:

- the experts step (``impl="moekit-experts"``) where the issue's reference is an experts step: #11
  against vLLM's experts step (GEMMs only, align + GEMMs; gpt-oss-120b from the ``gpt-oss-120b-silu``
  rows, as vLLM ran silu there), #11 compute-bound % of the bf16 peak (the issue's 11.3 ms / 52 % for
  DeepSeek-V3 T = 4096 is the experts step), #9 fp8 against vLLM's fp8 path;
- the whole layer (``impl="moekit"``) otherwise: #9 and #10 speedups over bf16 moekit, % of the
  format's roofline, 4-bit against fp8.

Rows of older runs (quantised whole layer as ``impl="moekit-<quant>"``) are read as ``impl="moekit"``.
``--plot``: the speed plot of :mod:`moekit.benchmarking.plot` with the baseline's points.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BASELINE = ROOT / "benchmarks" / "baselines" / "vllm-h200.json"
TOKENS = (1, 8, 64, 256, 1024, 4096, 16384)
SHAPES = ("deepseek-v3", "qwen3-30b-a3b", "mixtral-8x7b", "gpt-oss-120b", "longcat-flash")
PEER11 = ("qwen3-30b-a3b", "mixtral-8x7b", "gpt-oss-120b", "deepseek-v3")
FOUR = ("deepseek-v3", "gpt-oss-120b", "mixtral-8x7b", "qwen3-30b-a3b")
UNQUANT = ("bf16", "fp16")
QUANTS = ("fp8", "mxfp4", "int4")


# -- reading -------------------------------------------------------------------------------------
def normalise(row: dict) -> dict:
    """A row in today's naming: ``moekit-<quant>`` -> impl ``moekit`` + quant; a moekit row without a
    quant gets the unquantised dtype's."""
    r = dict(row)
    impl = r.get("impl", "")
    if impl.startswith("moekit-") and impl[7:] in QUANTS:
        r["impl"], r["quant"] = "moekit", impl[7:]
    if r.get("quant") is None and r["impl"] in ("moekit", "moekit-experts", "baseline"):
        r["quant"] = {"float16": "fp16"}.get(r.get("dtype"), "bf16")
    return r


#: the keys every row of a ``moekit bench`` JSON (and of a baseline file) has, old schemas included
ROW_KEYS = ("model", "tokens", "impl", "us")


def read_rows(path, what: str = "moekit bench JSON") -> tuple:
    """(the file's JSON, its rows: the list, or an object's ``rows``); ``ValueError`` naming the file where it is
    not JSON or its rows lack :data:`ROW_KEYS` (another script's output), ``OSError`` where it cannot be read."""
    try:
        data = json.loads(Path(path).read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not JSON ({err})") from None
    rows = data.get("rows") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not all(isinstance(r, dict) and all(k in r for k in ROW_KEYS) for r in rows):
        raise ValueError(f"{path} is not a {what}: expected a list of rows {{{', '.join(ROW_KEYS)}, ...}}")
    return data, rows


def load_rows(path) -> list[dict]:
    """The rows of ``path``, normalised; a row without a ``device`` takes the file's (older files hold it once, in
    their object: round 33's layer profiles)."""
    data, rows = read_rows(path)
    device = data.get("device") if isinstance(data, dict) else None
    return [normalise(dict(r, device=device) if device and not r.get("device") else r) for r in rows]


class Rows:
    """Rows indexed by (model, tokens, impl, quant); the last one wins."""

    def __init__(self, rows):
        self.rows = list(rows)
        self.by = {(r["model"], r["tokens"], r["impl"], r.get("quant")): r for r in self.rows}
        self.meta = next((r["meta"] for r in self.rows if r.get("meta")), {})

    def get(self, model, t, impl, quant="bf16"):
        if quant == "bf16" and (model, t, impl, "bf16") not in self.by:
            quant = "fp16"
        # a row that names no quant (a peer file's rows may not: read_rows needs only model, tokens, impl, us) is
        # the one row of its (model, tokens, impl): without this fallback its points were dropped from #11 / #9
        return self.by.get((model, t, impl, quant)) or self.by.get((model, t, impl, None))

    def us(self, model, t, impl, quant="bf16"):
        r = self.get(model, t, impl, quant)
        return r["us"] if r else None

    def models(self, among=SHAPES):
        have = {r["model"] for r in self.rows}
        return [m for m in among if m in have]

    def tokens(self, model=None):
        """The sweep's token counts (eager rows, ``host_us``, are timed at their own ``--eager-tokens``: not points)."""
        return sorted({r["tokens"] for r in self.rows
                       if (model is None or r["model"] == model) and r.get("host_us") is None})

    def peak(self, row) -> float | None:
        """The bf16 peak (TFLOP/s) of the run: the row's ``peak_tflops`` or the meta's."""
        if row.get("quant") in UNQUANT and row.get("peak_tflops"):
            return row["peak_tflops"]
        return (row.get("meta") or self.meta).get("bf16_peak_TFLOPs")


# -- markdown ------------------------------------------------------------------------------------
def num(v, digits=1) -> str:
    if v is None:
        return "–"
    return f"{v:,.{digits}f}".replace(",", " ") if abs(v) < 1e5 else f"{v:.0f}"


def mark(ok) -> str:
    return "–" if ok is None else ("✓" if ok else "✗")


def geomean(xs) -> float | None:
    xs = [x for x in xs if x]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


class Report:
    def __init__(self):
        self.lines: list[str] = []
        self.verdicts: list[tuple[str, bool, str]] = []

    def heading(self, text):
        self.lines += ["", f"### {text}", ""]

    def table(self, header, body):
        self.lines.append("| " + " | ".join(header) + " |")
        self.lines.append("|" + "---|" * len(header))
        self.lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
        self.lines.append("")

    def note(self, text):
        self.lines.append(text)

    def verdict(self, issue: str, target: str, oks: list, extra: str = "") -> None:
        """``oks``: one bool per expected point (None: the point is missing)."""
        have = [o for o in oks if o is not None]
        missing = len(oks) - len(have)
        met = bool(oks) and missing == 0 and all(have)
        detail = f"{sum(have)}/{len(oks)} points" + (f", {missing} missing" if missing else "") + extra
        self.verdicts.append((issue, met, f"{target}: {detail}"))
        self.lines.append(f"**{'met' if met else 'MISSED'}** — {target}: {detail}")
        self.lines.append("")

    def summary(self) -> list[str]:
        out = ["", "## Summary", ""]
        out += [f"- {mark(ok)} {issue} {text}" for issue, ok, text in self.verdicts]
        n = sum(ok for _, ok, _ in self.verdicts)
        out.append(f"\n{n} of {len(self.verdicts)} targets met.")
        return out


# -- the targets ---------------------------------------------------------------------------------
def issue11_peer(R: Rows, B: Rows, rep: Report) -> None:
    rep.heading("#11 · experts step (`moekit-experts`, bf16) vs vLLM's experts step (bf16, issue #11 table)")
    body, ok_gemms, speedups = [], [], []
    for model in PEER11:
        ref = B.get(model, 1, "vllm-gemms") or {}
        mine = f"{model}-silu" if ref.get("activation") == "silu" and R.models((f"{model}-silu",)) else model
        for t in TOKENS:
            us, full, gemms = R.us(mine, t, "moekit-experts"), B.us(model, t, "vllm-full"), B.us(model, t, "vllm-gemms")
            if full is None and gemms is None:
                continue
            ok = None if us is None or gemms is None else us <= gemms
            sp = full / us if us and full else None
            ok_gemms.append(ok)
            speedups.append(sp)
            body.append([mine, t, num(us), num(full), num(gemms), mark(ok), num(sp, 2)])
    rep.table(["shape (moekit rows)", "T", "moekit µs", "vLLM align+GEMMs µs", "vLLM GEMMs µs", "≤ GEMMs",
               "× vs align+GEMMs"], body)
    rep.note("gpt-oss-120b: vLLM ran silu without biases; moekit's `gpt-oss-120b-silu` rows are the same step "
             "(the `gpt-oss-120b` rows, swigluoai + biases, are used only when those are missing).")
    rep.note("")
    rep.verdict("#11", "experts step ≤ vLLM GEMMs-only at every point", ok_gemms)
    g = geomean(speedups) if all(speedups) else None
    rep.verdict("#11", "geometric mean × over vLLM align+GEMMs ≥ 1.25", [None if g is None else g >= 1.25],
                f", geomean {num(g, 3)}" + ("" if all(speedups) else " (points missing)"))


def issue11_compute(R: Rows, rep: Report) -> None:
    rep.heading("#11 · compute-bound: experts step (`moekit-experts`, bf16) % of the run's bf16 matmul peak, "
                "T ≥ 4096")
    body, oks = [], []
    for model in ("deepseek-v3", "gpt-oss-120b", "mixtral-8x7b"):
        for t in [t for t in TOKENS if t >= 4096]:
            r = R.get(model, t, "moekit-experts")
            layer = R.get(model, t, "moekit")
            pct = 100 * r["tflops"] / R.peak(r) if r and r.get("tflops") and R.peak(r) else None
            lpct = 100 * layer["tflops"] / R.peak(layer) if layer and layer.get("tflops") and R.peak(layer) else None
            oks.append(None if pct is None else pct >= 75)
            body.append([model, t, num(r and r["us"]), num(r and r.get("tflops")), num(r and R.peak(r), 0), num(pct),
                         mark(oks[-1]), num(lpct)])
    rep.table(["shape", "T", "experts µs", "TFLOP/s", "peak TFLOP/s", "% peak", "≥ 75 %", "whole layer % peak"],
              body)
    rep.note("gpt-oss-120b: the shape's own rows (swigluoai + biases); the peak is the run's measured bf16 "
             "matmul rate.")
    rep.note("")
    rep.verdict("#11", "experts step ≥ 75 % of the bf16 peak at T ≥ 4096 (DeepSeek-V3, gpt-oss, Mixtral)", oks)


def expected(R: Rows) -> list[tuple[str, int]]:
    """The points a verdict expects: the four shapes the issues name (and any other benchmark shape of the
    run) at the seven token counts (and any other of the run); a point without rows counts as missing."""
    models = list(FOUR) + [m for m in R.models() if m not in FOUR]
    return [(m, t) for m in models for t in sorted(set(TOKENS) | set(R.tokens(m)))]


def pct_roofline(r: dict | None) -> float | None:
    """A row's % of its roofline, unrounded where the row has its floor (round 63: the stored value is rounded to
    0.1, so 84.96 % passed "≥ 85"); rows without ``floor_us``: the stored value."""
    if r is None:
        return None
    return 100 * r["floor_us"] / r["us"] if r.get("floor_us") and r.get("us") else r.get("pct_roofline")


def issue9(R: Rows, B: Rows, rep: Report) -> None:
    rep.heading("#9 · fp8: whole layer (`moekit`) fp8 vs bf16, % of the fp8 roofline; experts step vs vLLM fp8")
    body, small, big, roof, peer = [], [], [], [], []
    for model, t in expected(R):
        bf, f8 = R.get(model, t, "moekit"), R.get(model, t, "moekit", "fp8")
        sp = bf["us"] / f8["us"] if bf and f8 else None
        if t <= 64:
            small.append(None if sp is None else sp >= 1.8)
        if t == 16384:
            big.append(None if sp is None else sp >= 1.6)
        pct = pct_roofline(f8)
        goal = (80 if model == "qwen3-30b-a3b" else 85) if model in FOUR and 8 <= t <= 1024 else None
        if goal:
            roof.append(None if pct is None else pct >= goal)
        ex, ref = R.us(model, t, "moekit-experts", "fp8"), B.us(model, t, "vllm-fp8", "fp8")
        beat = None if ex is None or ref is None else ex < ref
        if ref is not None:
            peer.append(beat)
        body.append([model, t, num(bf and bf["us"]), num(f8 and f8["us"]), num(sp, 2), num(pct),
                     f"≥ {goal} {mark(None if pct is None else pct >= goal)}" if goal else "", num(ex), num(ref),
                     mark(beat) if ref is not None else ""])
    rep.table(["shape", "T", "bf16 layer µs", "fp8 layer µs", "×", "% fp8 roofline", "target", "fp8 experts µs",
               "vLLM fp8 µs", "< vLLM"], body)
    rep.verdict("#9", "fp8 ≥ 1.8× bf16 (whole layer) at T ≤ 64", small)
    rep.verdict("#9", "fp8 ≥ 1.6× bf16 (whole layer) at T = 16384", big)
    rep.verdict("#9", "fp8 ≥ 85 % of the fp8 roofline at 8 ≤ T ≤ 1024 (Qwen3 ≥ 80 %)", roof)
    rep.verdict("#9", "fp8 experts step faster than vLLM's fp8 path at every point", peer)


def issue10(R: Rows, rep: Report) -> None:
    for q in ("mxfp4", "int4"):
        rep.heading(f"#10 · {q}: whole layer (`moekit`) vs bf16 and fp8, % of the 4-bit roofline")
        body, fast, roof, vs8, big = [], [], [], [], []
        for model, t in expected(R):
            bf, f8, r = (R.get(model, t, "moekit", k) for k in ("bf16", "fp8", q))
            sp = bf["us"] / r["us"] if bf and r else None
            checks = []
            if t <= 8 and model in ("gpt-oss-120b", "deepseek-v3"):
                fast.append(None if sp is None else sp >= 3)
                roof.append(None if r is None else pct_roofline(r) >= 80)
                checks += [f"≥3× {mark(fast[-1])}", f"≥80 % {mark(roof[-1])}"]
            if 8 < t <= 256:
                vs8.append(None if r is None or f8 is None else r["us"] <= f8["us"])
                checks.append(f"≤ fp8 {mark(vs8[-1])}")
            if t >= 1024:
                big.append(None if r is None or bf is None else r["us"] <= 1.15 * bf["us"])
                checks.append(f"≤ 1.15× bf16 {mark(big[-1])}")
            body.append([model, t, num(bf and bf["us"]), num(f8 and f8["us"]), num(r and r["us"]), num(sp, 2),
                         num(pct_roofline(r)), ", ".join(checks)])
        rep.table(["shape", "T", "bf16 µs", "fp8 µs", f"{q} µs", "× vs bf16", "% 4-bit roofline", "targets"], body)
        rep.verdict("#10", f"{q} ≥ 3× bf16 at T ≤ 8 (gpt-oss-120b, DeepSeek-V3)", fast)
        rep.verdict("#10", f"{q} ≥ 80 % of the 4-bit roofline at T ≤ 8 (gpt-oss-120b, DeepSeek-V3)", roof)
        rep.verdict("#10", f"{q} never slower than fp8 at 8 < T ≤ 256", vs8)
        rep.verdict("#10", f"{q} within 15 % of bf16 at T ≥ 1024", big)


def issue11_eager(R: Rows, rep: Report) -> None:
    eager = {(r["model"], r["tokens"]): r for r in R.rows if r["impl"] == "eager-layer" and r["tokens"] <= 8}
    if not eager:
        return
    rep.heading("#11 · eager `FusedMoE` forward (`eager-layer`): host µs per call vs GPU µs, T ≤ 8")
    body, oks = [], []
    # the points: the four shapes at T = 1 and 8, and any other eager row present (another shape or T <= 8); a
    # point of the four shapes without its row counts as missing, as in the other targets
    points = sorted({(m, t) for m in FOUR for t in (1, 8)} | set(eager), key=lambda p: (p[0] not in FOUR, p))
    for model, t in points:
        r = eager.get((model, t))
        if r is None:
            oks.append(None)
            body.append([model, t, "–", "–", mark(None), "–"])
            continue
        ok = r["host_us"] <= 40 and (r["model"] != "qwen3-30b-a3b" or r["host_us"] <= r["us"])
        oks.append(ok)
        nog = R.get(r["model"], r["tokens"], "eager-layer-nograph", r.get("quant"))
        body.append([r["model"], r["tokens"], num(r["host_us"]), num(r["us"]), mark(ok),
                     num(nog and nog.get("host_us"))])
    rep.table(["shape", "T", "host µs", "GPU µs", "≤ 40 (Qwen3: ≤ GPU)", "host µs without the internal graph"],
              body)
    rep.verdict("#11", "eager layer host ≤ 40 µs at T ≤ 8 (Qwen3-30B-A3B: ≤ its GPU µs)", oks)


def report(rows, baseline_rows=(), source: str = "") -> tuple[str, Report]:
    R, B = Rows(rows), Rows(normalise(r) for r in baseline_rows)
    rep = Report()
    meta = R.meta
    dev = next((r.get("device") for r in R.rows if r.get("device")), "?")
    rep.lines += [f"# moekit bench vs issues #9, #10, #11 — {dev}", ""]
    if source:
        rep.note(f"results: `{source}`")
    rep.note(f"ceilings of the run: read {meta.get('read_bw_TBps')} TB/s, copy {meta.get('copy_bw_TBps')} TB/s, "
             f"bf16 {meta.get('bf16_peak_TFLOPs')} TFLOP/s, fp8 {meta.get('fp8_peak_TFLOPs')} TFLOP/s; "
             f"formats {meta.get('quants')}")
    if meta.get("partial"):
        rep.note("**partial run**: the bench stopped before its last shape; only the shapes finished are here")
    if B.rows:
        rep.note("")
        rep.note(f"peer: {B.meta.get('source') if B.meta else 'baseline file'}")
        if B.meta.get("device") and B.meta["device"] != dev:  # the peer's µs are constants measured on its GPU
            rep.note(f"**the peer ran on {B.meta['device']}, this run on {dev}**: its µs verdicts compare two GPUs")
    issue11_peer(R, B, rep)
    issue11_compute(R, rep)
    issue9(R, B, rep)
    issue10(R, rep)
    issue11_eager(R, rep)
    return "\n".join(rep.lines + rep.summary()) + "\n", rep


def load_baseline(path) -> list[dict]:
    """The baseline's rows, each carrying the file's ``source`` and ``device`` as ``meta``."""
    data, rows = read_rows(path, "baseline file")
    src = dict(source=data.get("source"), device=data.get("device")) if isinstance(data, dict) else {}
    return [dict(r, meta=src) for r in rows]


class OneLineParser(argparse.ArgumentParser):
    """argparse with a usage error on one line, as ``moekit``'s (``moekit._argparse``; this script runs without
    torch, so it does not import moekit)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def main(argv=None) -> int:
    p = OneLineParser(prog="compare.py", description=__doc__.split("\n")[0])
    p.add_argument("results", help="a moekit bench JSON")
    p.add_argument("--baseline", default=str(DEFAULT_BASELINE),
                   help="the peer's numbers (default: benchmarks/baselines/vllm-h200.json); 'none' for none")
    p.add_argument("--md", default=None, help="also write the markdown here")
    p.add_argument("--plot", default=None, help="also write the speed plot (µs vs T per shape, with the baseline)")
    args = p.parse_args(argv)
    for opt, path in (("--md", args.md), ("--plot", args.plot)):  # checked before the report, not after it
        if path and (Path(path).is_dir() or not Path(path).parent.is_dir()):
            p.error(f"argument {opt}: expected a file path in an existing folder, got {path!r}")
    try:
        rows = load_rows(args.results)
        base = [] if args.baseline in (None, "", "none") else load_baseline(args.baseline)
    except (OSError, ValueError) as err:
        p.error(str(err))
    if not rows:
        p.error(f"{args.results} holds no rows: nothing to compare")
    text, _ = report(rows, base, source=args.results)
    if args.md:  # the files first: a closed pipe on the report must not lose them (round 62)
        Path(args.md).write_text(text)
    if args.plot:
        try:
            sys.path.insert(0, str(ROOT / "src"))
            from moekit.benchmarking.plot import plot_speed

            plot_speed(rows, Path(args.plot), base)
        except ImportError as exc:
            print(f"plot skipped: {exc}", file=sys.stderr)
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `compare.py ... | head`: the shell's 141, no traceback (as the moekit command)
        sys.path.insert(0, str(ROOT / "src"))
        from moekit._argparse import reader_left

        return reader_left()
    return 0


if __name__ == "__main__":
    sys.exit(main())
