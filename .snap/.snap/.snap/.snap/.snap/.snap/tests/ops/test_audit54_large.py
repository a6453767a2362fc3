"""Offsets past 2^31 elements on CPU (round 54's int32 audit; the GPU side: ``test_audit54_large_gpu.py``).

In Triton a product of int32 values stays int32 and wraps silently, and an int argument below 2^31 (a stride) is
int32. These tests check, without a GPU:

- the launch plan's arithmetic at the audited sizes (T up to 2M tokens, H <= 8192, I <= 18432, K <= 16, E <= 512,
  bf16 / fp8 block / 4-bit): what every kernel keeps in int32 (slot, row and token ids, counters, program ids,
  grid sizes, the uncast products) stays below 2^31 inside one chunk, while rows · I, slots · H and tokens · H
  pass it (the int64 casts at those multiplies are load-bearing);
- one chunk's scratch stays under the workspace bound, also with the split w13's fp32 rows (they were uncounted);
- kernels under the interpreter reading / writing rows that lie past 2^31 elements of their tensor, through row
  views of a large lazily mapped storage (only the touched pages are backed): the router gate's chunk-partial sum
  (its ``s · stride_ps`` wrapped), and as guards the experts path (every align layout, fused / separate top-k sum,
  K = 1, a dead token), the quantised experts' input paths, the routing, gate and zero-expert kernels. Each runs
  in its own process: a wrapped offset may crash it.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from moekit.ops import triton_experts as te
from moekit.ops.config_heuristic import heuristic_config
from moekit.ops.triton_experts_quant import QuantLaunch
from moekit.ops.triton_plan import _freeze, launch_plan

P31 = 2**31
SRC = Path(__file__).resolve().parents[2] / "src"


# -- the launch plan's arithmetic -----------------------------------------------------------------------------------
def _fp8(block_k: int = 128):
    """A stand-in :class:`QuantLaunch` with the fp8 block format's scratch accounting."""
    q = SimpleNamespace(fp8=True, pack=1, spec=SimpleNamespace(block_k=block_k))
    q.bytes_per_token = lambda *a: QuantLaunch.bytes_per_token(q, *a)
    return q


def _plan(t, h, inter, k, e, cfg, dtype=torch.bfloat16):
    return launch_plan(t, h, inter, 2 * inter, e, e, k, dtype, 0, True, False, False, False, False, None, False,
                       te.SMALL_SLOTS, te.INLINE_SLOTS, _freeze(cfg))


def _narrow() -> dict:
    """The most programs and rows a config can give: BLOCK_M 16, 16-wide tiles."""
    c = dict(BN=16, BK=64, GROUP_M=8, num_warps=4, num_stages=3)
    return {"BLOCK_M": 16, "w13": dict(c), "w2": dict(c), "sum_pass": False}


SWEEP = [(t, h, i, k, e) for t in (4096, 300_000, 2_000_000) for h in (1024, 2880, 7168, 8192)
         for i in (64, 768, 2048, 18432) for k in (1, 2, 8, 16) for e in (8, 128, 512)]


@pytest.mark.parametrize("quant", [None, "fp8_block", "mxfp4"])
def test_launch_plan_int32_quantities_at_audited_sizes(quant):
    """Every quantity the kernels hold in int32 stays < 2^31 within a chunk (T·K slots, padded rows, the sorted ids
    and expert offsets, the (token, column block) semaphores, program ids / grid sizes, persistent tile counters,
    TMA row coordinates, and the products left in int32: the fp8 sorted rows' scale offsets (⌈H/bk⌉ · rows, in
    ``act_quant_sorted_kernel`` and the warp-specialised fp8 w13)), while the products that are cast to int64 do pass
    2^31 at these sizes."""
    big = dict(rows_i=0, slots_h=0, tokens_h=0)
    for t, h, i, k, e in SWEEP:
        for cfg in (heuristic_config(t, e, h, i, k, torch.bfloat16, 132, quant, capability=(9, 0)), _narrow()):
            q = _fp8() if quant == "fp8_block" else None
            if q is not None:
                cfg = dict(cfg, w13=dict(cfg["w13"], gluon_ws=1))  # sorted-row x_q: the most scratch per slot
            chunk = te.chunk_size(t, h, i, k, e, 2, cfg, q)
            p = _plan(chunk, h, i, k, e, cfg)
            slots = chunk * k
            ints = dict(slots=slots, rows=p.rows, i32=p.i32_total, sem=chunk * p.nbn, grid13=p.grid13[0],
                        grid2=p.grid2[0], grid_sum=p.grid_sum[0], tiles13=p.num_pid_m * -(-i // p.bn13) * 2,
                        tiles2=p.num_pid_m * p.nbn, row_w13=e * 2 * i + i, row_w2=e * h + h)
            if q is not None:
                ints["fp8_sorted_scales"] = -(-h // q.spec.block_k) * p.rows
            over = {n: v for n, v in ints.items() if v >= P31}
            assert not over, (t, h, i, k, e, cfg, over)
            big = dict(rows_i=max(big["rows_i"], p.rows * i), slots_h=max(big["slots_h"], slots * h),
                       tokens_h=max(big["tokens_h"], chunk * h))
    if quant is None:  # 4-bit and bf16 share the activations' scratch; fp8 rows are bytes: see the GPU test
        assert min(big.values()) >= P31, big


def _scratch_bytes(p, h: int, inter: int, elt: int) -> int:
    """What :func:`te._run_chunk` allocates for an unquantised chunk of plan ``p``."""
    part = p.part_rows * h * 4 if p.part_fp32 else 0
    split = p.rows * 2 * inter * 4 if p.split else 0  # w13's fp32 gate | up rows before the epilogue pass
    return p.i32_total * 4 + p.buf_total * elt + part + split


@pytest.mark.parametrize("split", [False, True], ids=["fused_w13", "w13_split"])
@pytest.mark.parametrize("t,h,i,k,e,dtype", [
    (300_000, 1024, 8192, 1, 4, torch.bfloat16),  # one chunk of 300K tokens before the split rows were counted
    (2_000_000, 7168, 2048, 8, 256, torch.bfloat16),
    (65536, 4096, 18432, 2, 8, torch.float16),  # fp16: the slot rows in their own fp32 buffer
    (2_000_000, 8192, 64, 16, 512, torch.float32),
])
def test_chunk_scratch_within_the_workspace_bound(t, h, i, k, e, dtype, split):
    """The chunk size keeps one chunk's scratch (the plan's buffers, as ``_run_chunk`` allocates them) under
    ``DEFAULT_WORKSPACE_BYTES``. Before round 54 the split w13's fp32 ``[rows, 2I]`` was not counted: 24.6 GB in one
    300K-token chunk of the first shape (K = 1, I = 8192), 4x the 6 GiB bound."""
    cfg = dict(heuristic_config(t, e, h, i, k, dtype, 132), w13_split=split)
    elt = torch.empty(0, dtype=dtype).element_size()
    chunk = te.chunk_size(t, h, i, k, e, elt, cfg, half=dtype == torch.float16)
    p = _plan(chunk, h, i, k, e, cfg, dtype)
    assert p.split == split
    assert _scratch_bytes(p, h, i, elt) <= te.DEFAULT_WORKSPACE_BYTES, chunk


# -- kernels on rows past 2^31 elements, under the interpreter, one process each ------------------------------------
PRELUDE = '''
import json, sys
import torch

STRIDE = 2**30 + 64  # row r of a huge view starts at element r * STRIDE: row 2 past 2^31


def huge_rows(rows, width, dtype):
    """[rows, width] rows STRIDE elements apart in a lazily mapped storage (only the written pages are backed)."""
    try:
        base = torch.empty((rows - 1) * STRIDE + width, dtype=dtype)
    except RuntimeError as err:  # the host will not map it
        print(json.dumps({"skip": f"cannot map a {(rows - 1) * STRIDE:,}-element storage: {err}"[:300]}))
        sys.exit(0)
    return base.as_strided((rows, width), (STRIDE, 1))


def same(a, b):
    return bool(torch.equal(a, b))
'''


def _isolated(body: str, timeout: int = 300) -> dict:
    """Run ``PRELUDE + body`` in a fresh process under the interpreter; its last stdout line is a JSON dict."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert run.returncode == 0, f"exit {run.returncode} (a wrapped offset?)\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    res = json.loads(run.stdout.strip().splitlines()[-1])
    if "skip" in res:
        pytest.skip(res["skip"])
    return res


def test_gate_chunk_sum_past_2_31():
    """``gate_sum_kernel`` sums the fp32 partials ``part[s, t, :]`` of H's chunks; ``s · stride_ps`` was an int32
    product (loop index times an int32 stride) and wrapped once ``s · stride_ps >= 2^31`` (a router gate with
    (S - 1) · 65536 · N >= 2^31, e.g. N >= 4682 columns at H = 8192): a crash or a wrong row before round 54."""
    res = _isolated('''
        from moekit.ops._triton.gate import gate_sum_kernel
        S, T, N = 3, 2, 16
        base = huge_rows(S, T * N, torch.float32)  # chunk s at element s * STRIDE
        part = base.as_strided((S, T, N), (STRIDE, N, 1))
        for s in range(S):
            part[s] = float(10**s) + torch.arange(T * N, dtype=torch.float32).view(T, N)
        bias = torch.full((N,), 0.5)
        out = torch.empty(T, N)
        gate_sum_kernel[(T, 1)](part, bias, out, N, S, part.stride(0), part.stride(1), out.stride(0),
                                BN=16, HAS_BIAS=True, INTERP=True)
        want = sum(part[s] for s in range(S)) + bias
        print(json.dumps({"ok": same(out, want)}))
    ''')
    assert res["ok"]


def test_experts_rows_past_2_31():
    """The experts kernels read ``x`` rows and write ``out`` rows lying past 2^31 elements (tok · stride in int64):
    inline layout and fused sum, the one-program and count + scatter align kernels, the sum pass, K = 1 (w2 writes
    ``out`` itself), a token with no live slot (its row zeroed by the align kernel / the inline prologue); each the
    same bits as the same call on compact rows."""
    res = _isolated('''
        from moekit.ops import triton_experts as te
        g = torch.Generator().manual_seed(54)
        T, H, I, E = 3, 32, 16, 4
        w1 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).bfloat16()
        w2 = (torch.randn(E, H, I, generator=g) / I**0.5).bfloat16()
        xs = torch.randn(T, H, generator=g).bfloat16()
        res = {}
        for name, k, inline, small, sum_pass, dead in [
                ("inline", 2, 16, 1024, None, False), ("inline_dead", 2, 16, 1024, None, True),
                ("align_small_sum_pass", 2, 0, 1024, True, False), ("align_multi_fused", 2, 0, 0, False, True),
                ("align_multi_sum_pass_k1", 1, 0, 0, True, False)]:
            te.INLINE_SLOTS, te.SMALL_SLOTS = inline, small
            ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).int()
            if dead:
                ids[2] = -1  # every slot of the last token (at row 2 * STRIDE) dead: a zero row
            w = torch.rand(T, k, generator=g) + 0.1
            cfg = dict(te.get_config(xs.device, T, E, H, I, k, xs.dtype, True), sum_pass=sum_pass)
            want = te.fused_experts_impl(xs, w1, w2, w, ids, "silu", False, None, None, None, None, config=cfg)
            x, out = huge_rows(T, H, torch.bfloat16), huge_rows(T, H, torch.bfloat16)
            x.copy_(xs)
            out.fill_(float("nan"))
            te.fused_experts_impl(x, w1, w2, w, ids, "silu", False, None, None, None, None, config=cfg, out=out)
            res[name] = same(out, want)
            del x, out
        print(json.dumps(res))
    ''')
    assert all(res.values()), res


def test_quant_experts_input_rows_past_2_31():
    """The quantised experts read their input rows past 2^31 elements: the fp8 block input quantiser
    (``act_quant_kernel``) and the 4-bit formats' w13 gather; the same bits as compact rows."""
    res = _isolated('''
        from moekit.ops.formats import Fp8BlockFormat, Int4GroupFormat, Mxfp4Format
        from moekit.ops.quant_spec import QuantSpec
        from moekit.ops.quantize import quantize_experts
        from moekit.ops.triton_experts_quant import fused_experts_quant_impl
        g = torch.Generator().manual_seed(54)
        T, K, H, I, E = 3, 2, 128, 64, 4
        w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).bfloat16()
        w2 = (torch.randn(E, H, I, generator=g) / I**0.5).bfloat16()
        xs = torch.randn(T, H, generator=g).bfloat16()
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).int()
        w = torch.rand(T, K, generator=g) + 0.1
        res = {}
        for name, fmt in (("fp8_block", Fp8BlockFormat(32, 32)), ("mxfp4", Mxfp4Format()),
                          ("int4", Int4GroupFormat(32))):
            q13, q2, s13, s2 = quantize_experts(w13, w2, fmt)
            run = lambda x: fused_experts_quant_impl(x, q13, q2, w, ids, QuantSpec.of(fmt), s13, s2, None, None,
                                                     "silu", False, None, None, None, None)
            x = huge_rows(T, H, torch.bfloat16)
            x.copy_(xs)
            res[name] = same(run(x), run(xs))
            del x
        print(json.dumps(res))
    ''')
    assert all(res.values()), res


def test_routing_gate_and_zero_kernels_rows_past_2_31():
    """The routing kernel (logits rows), the router gate (input rows, one and two chunks of H) and the zero-expert
    kernels (input / routed rows) past 2^31 elements; the same bits as compact rows."""
    res = _isolated('''
        from moekit.ops.routing import TopKSpec
        from moekit.ops.triton_gate import router_gate_impl
        from moekit.ops.triton_routing import route_impl
        from moekit.ops.triton_zero import zero_combine_impl, zero_slots_impl
        g = torch.Generator().manual_seed(54)
        T, E, K = 3, 16, 4
        res = {}
        ls = torch.randn(T, E, generator=g)
        logits = huge_rows(T, E, torch.float32)
        logits.copy_(ls)
        args = (4, "softmax", True, 1.0, 1, 1, torch.int32)
        a, b = route_impl(logits, None, *args), route_impl(ls, None, *args)
        res["route"] = same(a[0], b[0]) and same(a[1], b[1])
        del logits
        for h in (256, 2048):  # one pass; two chunks of H and their sum
            xs = torch.randn(T, h, generator=g).bfloat16()
            wg = (torch.randn(E, h, generator=g) / h**0.5).bfloat16()
            x = huge_rows(T, h, torch.bfloat16)
            x.copy_(xs)
            res[f"gate_{h}"] = same(router_gate_impl(x, wg, None, torch.float32),
                                    router_gate_impl(xs, wg, None, torch.float32))
            del x
        h = 64
        xs = torch.randn(T, h, generator=g).bfloat16()
        ids = torch.randint(0, E + 2, (T, K), generator=g, dtype=torch.int32)  # ids >= E: zero experts
        w = torch.rand(T, K, generator=g)
        x = huge_rows(T, h, torch.bfloat16)
        x.copy_(xs)
        s = zero_slots_impl(w, ids, E)[2]
        res["zero_combine"] = same(zero_combine_impl(x, x, s, 2.5), zero_combine_impl(xs, xs, s, 2.5))
        print(json.dumps(res))
    ''')
    assert all(res.values()), res
