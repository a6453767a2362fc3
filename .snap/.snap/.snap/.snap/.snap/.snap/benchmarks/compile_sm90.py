"""Compile the Triton experts kernels for sm_90 (Hopper) on a machine without a GPU.

The launcher runs in warm-up mode on CPU tensors (never touched: ``torch.empty``); every kernel launch
is intercepted and compiled by Triton's own binder and ``triton.compile`` for ``GPUTarget("cuda", 90,
32)`` (Triton ships ptxas), so the compile errors a first run on an H100/H200 would hit show up here,
and the TTGIR / PTX / SASS can be inspected. Must run without ``TRITON_INTERPRET`` (the interpreter
replaces ``triton.jit`` kernels by interpreted ones at import).

    python benchmarks/compile_sm90.py                      # every quantised format, DeepSeek-V3 and gpt-oss slices
    python benchmarks/compile_sm90.py --fmt fp8_block --t 1 --dump /tmp/ir  # write .ttgir/.ptx per kernel

Configs: :func:`moekit.ops.triton_configs.heuristic_config` with 132 SMs and the format (what a GPU
without a tuned file runs), then the format's :meth:`QuantSpec.fix_config`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_sm90: unset TRITON_INTERPRET (the interpreter does not compile kernels)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from moekit.ops._device import KERNEL_OPTIONS  # noqa: E402
from moekit.ops import triton_configs as tc  # noqa: E402
from moekit.ops import triton_experts_quant as tq  # noqa: E402
from moekit.ops.triton_experts import fused_experts_impl  # noqa: E402
from moekit.ops.formats import Fp8BlockFormat, Fp8ChannelFormat, Int4GroupFormat, Mxfp4Format  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
FORMATS = {
    "bf16": None,  # the unquantised kernels (QUANT = 0)
    "fp8_block": Fp8BlockFormat(128, 128),
    "fp8_channel": Fp8ChannelFormat(),
    "fp8_tensor": Fp8ChannelFormat(per_tensor=True),
    "fp8_static": Fp8ChannelFormat(per_tensor=True, static_input=True),
    "mxfp4": Mxfp4Format(),
    "int4_g32": Int4GroupFormat(32),
    "int4_g128": Int4GroupFormat(128),
}
# (name, E, K, H, I, activation, bias)
SHAPES = {
    "deepseek": (16, 8, 7168, 2048, "silu", False),
    "gpt-oss": (32, 4, 2880, 2880, "swigluoai", True),
    "invariance": (64, 6, 2048, 768, "silu", False),
}


def compile_launch(fn: JITFunction, args, kwargs):
    """``fn[grid](*args, **kwargs)`` compiled for sm_90, not launched: the ``CompiledKernel`` (its ``asm``
    holds the ttir, ttgir, llir, ptx and cubin). Triton's cache applies (a second call is fast)."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**KERNEL_OPTIONS, **kwargs, "debug": False, "instrumentation_mode": ""}  # as every moekit launch
    kwargs.pop("launch_pdl", None)
    bound, spec, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    if getattr(fn, "is_gluon", lambda: False)():  # a Gluon kernel: its source sets the module's layout attributes
        from triton.experimental.gluon._runtime import GluonASTSource

        src = GluonASTSource(fn, signature, constexprs, attrs)
    else:
        src = triton.compiler.ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=TARGET, options=options.__dict__)


def _fp8_w2_args(bm: int, bn: int, i: int, h: int, e: int, bk: int = 128):
    """CPU tensors (never touched) and the positional arguments of the Gluon fp8 block w2 kernels (scale blocks
    of ``bk`` x ``bk``): (those up to ``sorted_ptr``, the rest); the persistent kernel takes its block -> expert
    table in between."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    f8, rows, t, k = torch.float8_e4m3fn, 64 * bm, 512, 8
    inter, w2 = torch.empty(rows, i, dtype=f8), torch.empty(e, h, i, dtype=f8)
    lay = lambda shape: gl.NVMMASharedLayout.get_default_for(shape, gl.float8e4nv)  # noqa: E731
    a_desc = TensorDescriptor.from_tensor(inter, [bm, bk], lay([bm, bk]))
    w_desc = TensorDescriptor.from_tensor(w2.view(-1, i), [bn, bk], lay([bn, bk]))
    a_s, w_s = torch.empty(rows, -(-i // bk)), torch.empty(e, -(-h // bk), -(-i // bk))
    tw, part = torch.empty(t, k), torch.empty(t * k, h)
    ints = torch.empty(rows, dtype=torch.int32)
    b2 = torch.empty(e, h, dtype=torch.bfloat16)
    head = (a_desc, w_desc, a_s, w_s, b2, tw, ints, ints, ints)
    tail = (part, h, i, e, k, rows // bm, -(-h // bn), a_s.stride(0), w_s.stride(0), w_s.stride(1), b2.stride(0),
            tw.stride(0), part.stride(0))
    return head, tail


def gluon_fp8_w2(bm: int = 64, bn: int = 128, i: int = 2048, h: int = 7168, e: int = 16, stages: int = 4,
                 bias: bool = False, on_input: bool = False, nt: int = 1):
    """The Gluon fp8 block w2 (:mod:`moekit.ops._gluon.fp8_w2`) compiled for sm_90 on CPU tensors (never
    touched): the ``CompiledKernel``."""
    from moekit.ops._gluon.fp8_w2 import fp8_w2_sum_kernel

    kw = dict(BM=bm, BN=bn, BK=128, QBN=128, GROUP_M=8, BLOCK_E=triton.next_power_of_2(e + 1), STAGES=stages,
              HAS_BIAS=bias, ON_INPUT=on_input, NT=nt, num_warps=bm // 16)
    head, tail = _fp8_w2_args(bm, bn, i, h, e)
    return compile_launch(fp8_w2_sum_kernel, head + tail, kw)


def gluon_fp8_w2_ws(bm: int = 64, bn: int = 128, i: int = 2048, h: int = 7168, e: int = 16, stages: int | None = None,
                    bias: bool = False, on_input: bool = False, nc: int = 2, bk: int = 128):
    """The warp-specialised, persistent Gluon fp8 block w2 (:mod:`moekit.ops._gluon.fp8_w2_ws`, ``nc``
    consumers, ``bk`` x ``bk`` scale blocks) compiled for sm_90 on CPU tensors (never touched): the
    ``CompiledKernel``. ``stages``: ring slots per consumer (None: the launcher's choice,
    :func:`moekit.ops.gluon_experts.fp8_w2_ws_stages`)."""
    from moekit.ops._gluon.fp8_w2_ws import fp8_w2_ws_sum_kernel
    from moekit.ops.gluon_experts import fp8_w2_ws_stages

    stages = stages or fp8_w2_ws_stages(bm, bn, bk, nc)
    kw = dict(BM=bm, BN=bn, BK=bk, QBN=bk, GROUP_M=8, BLOCK_E=triton.next_power_of_2(e + 1), STAGES=stages,
              HAS_BIAS=bias, ON_INPUT=on_input, NC=nc, num_warps=bm // 16)
    head, tail = _fp8_w2_args(bm, bn, i, h, e, bk)
    return compile_launch(fp8_w2_ws_sum_kernel, head + (head[-1],) + tail, kw)  # + the block -> expert table


def gluon_fp8_w13(bm: int = 64, bn: int = 64, h: int = 7168, i: int = 2048, e: int = 16, stages: int = 4,
                  bias: bool = False, req: int = 0, act: str = "silu", stack: bool = False):
    """The Gluon fp8 block w13 (:mod:`moekit.ops._gluon.fp8_w13`) compiled for sm_90 on CPU tensors (never
    touched): the ``CompiledKernel``. ``stack``: gate and up as one [2·BN, BK] tile and one wgmma."""
    from moekit.ops._gluon.fp8_w13 import fp8_w13_kernel

    args, kw = _fp8_w13_args(bm, bn, h, i, e, req, act, bias)
    return compile_launch(fp8_w13_kernel, args, dict(kw, STAGES=stages, STACK=stack))


def _fp8_w13_args(bm: int, bn: int, h: int, i: int, e: int, req: int, act: str, bias: bool, bk: int = 128):
    """CPU tensors (never touched), the positional arguments and the constexprs (but ``STAGES``) of the Gluon fp8
    block w13 (scale blocks of ``bk`` x ``bk``)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from moekit.ops.activation import get_activation

    f8, rows, t, k = torch.float8_e4m3fn, 64 * bm, 512, 8
    x, w1 = torch.empty(t, h, dtype=f8), torch.empty(e, 2 * i, h, dtype=f8)
    w_desc = TensorDescriptor.from_tensor(w1.view(-1, h), [bn, bk], gl.NVMMASharedLayout.get_default_for([bn, bk],
                                                                                                        gl.float8e4nv))
    nb = -(-i // bk)
    xs, ws = torch.empty(t, -(-h // bk)), torch.empty(e, 2 * nb, -(-h // bk))
    inter = torch.empty(rows, i, dtype=f8 if req else torch.bfloat16)
    is_ = torch.empty(rows, -(-i // bn))
    b1, out = torch.empty(e, 2 * i, dtype=torch.bfloat16), torch.empty(t, h, dtype=torch.bfloat16)
    ints = torch.empty(rows, dtype=torch.int32)
    a = get_activation(act)
    args = (x, w_desc, xs, ws, b1, inter, is_, out, ints, ints, ints, h, i, 2 * i, e, k, rows // bm, 7.0,
            x.stride(0), xs.stride(0), ws.stride(0), ws.stride(1), nb, b1.stride(0), inter.stride(0), is_.stride(0))
    kw = dict(BM=bm, BN=bn, BK=bk, QBN=bk, GROUP_M=8, BLOCK_E=triton.next_power_of_2(e + 1), ACT=a.code,
              HAS_BIAS=bias, HAS_LIMIT=act == "swigluoai", EVEN_K=h % bk == 0, REQ=req, UE8M0=False,
              num_warps=bm // 16)
    return args, kw


def gluon_fp8_w13_ws(bm: int = 64, bn: int = 64, h: int = 7168, i: int = 2048, e: int = 16,
                     stages: int | None = None, bias: bool = False, req: int = 0, act: str = "silu", nc: int = 2,
                     bk: int = 128):
    """The warp-specialised, persistent Gluon fp8 block w13 (:mod:`moekit.ops._gluon.fp8_w13_ws`, ``nc``
    consumers, ``bk`` x ``bk`` scale blocks) compiled for sm_90 on CPU tensors (never touched): the
    ``CompiledKernel``. ``stages``: ring slots per consumer (None: the launcher's choice,
    :func:`moekit.ops.gluon_experts.fp8_w13_ws_stages`)."""
    from moekit.ops._gluon.fp8_w13_ws import fp8_w13_ws_kernel
    from moekit.ops.gluon_experts import fp8_w13_ws_stages

    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    args, kw = _fp8_w13_args(bm, bn, h, i, e, req, act, bias, bk)
    rows = 64 * bm
    xq = torch.empty(rows, h, dtype=torch.float8_e4m3fn)  # the sorted rows, their scales transposed
    xs = torch.empty(-(-h // bk), rows)
    a_desc = TensorDescriptor.from_tensor(xq, [bm, bk], gl.NVMMASharedLayout.get_default_for([bm, bk],
                                                                                           gl.float8e4nv))
    kw = {n: v for n, v in kw.items() if n not in ("BLOCK_E", "EVEN_K")}
    kw.update(STAGES=stages or fp8_w13_ws_stages(bm, bn, bk, nc), NC=nc)
    if bm == 128 and nc == 2:  # two 64-row consumers on each tile: the default partition is one of them
        kw["num_warps"] = 4
    # (a_desc, w_desc, xs, ws, b1, inter, is, out, counts, row_start, the block -> expert table, H, I, N1, E_local,
    # num_pid_m, limit, xs's group stride, the weight scales' strides and shard, b1's, inter's, is' row strides)
    ws_args = (a_desc, args[1], xs) + args[3:10] + (args[8],) + args[11:15] + args[16:18] + (xs.stride(0),) + args[20:]
    return compile_launch(fp8_w13_ws_kernel, ws_args, kw)


def gluon_w4(which: str = "w13", quant: str = "mxfp4", bm: int = 16, bn: int = 64, h: int = 7168, i: int = 2048,
             e: int = 16, stages: int = 4, swap: bool = True, bias: bool = False, act: str = "silu", g: int = 32,
             wbuf: int = 2, wspec: tuple | None = None, rega: bool = False, serial: bool = False,
             sword: bool = False, early: bool = False, relaid: bool = False):
    """The Gluon 4-bit w13 / w2 (:mod:`moekit.ops._gluon.w4`) compiled for sm_90 on CPU tensors: the
    ``CompiledKernel``. ``wspec``: (D, DEC_REGS) compiles the warp-specialised kernels of
    :mod:`moekit.ops._gluon.w4_ws` instead (swapped; ``wbuf`` unused); ``rega``: the register-operand kernels of
    :mod:`moekit.ops._gluon.w4_rega` (swapped), ``serial`` their w13 with gate, then up (``"gluon_rega": 2``),
    ``sword`` (mxfp4) their step scales loaded as one u32 per row, ``early`` their ring refilled a step earlier
    (``"gluon_early": 1``), ``relaid`` their weights in the register-operand layout (:mod:`moekit.ops.w4_layout`)."""
    from moekit.ops._gluon.w4 import w4_w2_sum_kernel, w4_w13_kernel
    from moekit.ops._gluon.w4_rega import w4ra_w2_sum_kernel, w4ra_w13_kernel
    from moekit.ops._gluon.w4_ws import w4ws_w2_sum_kernel, w4ws_w13_kernel
    from moekit.ops.activation import get_activation

    code, pack = (3, 2) if quant == "mxfp4" else (4, 8)
    g = 32 if quant == "mxfp4" else g
    wdt = torch.uint8 if quant == "mxfp4" else torch.int32
    sdt = torch.uint8 if quant == "mxfp4" else torch.bfloat16
    rows, t, k, bk = 64 * max(bm, 16), 512, 8, 128
    ints = torch.empty(rows, dtype=torch.int32)
    common = dict(BM=bm, BN=bn, BK=bk, G=g, QUANT=code, GROUP_M=8, BLOCK_E=triton.next_power_of_2(e + 1),
                  STAGES=stages, HAS_BIAS=bias, SWAP=swap, WBUF=wbuf, num_warps=(bn if swap else bm) // 16)
    if wspec is not None:
        common.pop("SWAP"), common.pop("WBUF")
        common.update(D=wspec[0], DEC_REGS=wspec[1])
    serial_kw = {}
    if rega:
        common.pop("SWAP"), common.pop("WBUF")
        common["SWORD"] = sword
        common["EARLY"] = early
        common["RELAID"] = relaid
        serial_kw = {"SERIAL": serial}
    if which == "w13":
        x, w1 = torch.empty(t, h, dtype=torch.bfloat16), torch.empty(e, 2 * i, h // pack, dtype=wdt)
        ws = torch.empty(e, 2 * i, h // g, dtype=sdt)
        b1, inter = torch.empty(e, 2 * i, dtype=torch.bfloat16), torch.empty(rows, i, dtype=torch.bfloat16)
        a = get_activation(act)
        args = (x, w1, ws, b1, inter, ints, ints, ints, h, i, e, k, rows // bm, 7.0, x.stride(0), w1.stride(0),
                w1.stride(1), ws.stride(0), ws.stride(1), b1.stride(0), inter.stride(0))
        kw = dict(common, ACT=a.code, HAS_LIMIT=act == "swigluoai", EVEN_K=h % bk == 0, **serial_kw)
        kern = w4ra_w13_kernel if rega else w4ws_w13_kernel if wspec is not None else w4_w13_kernel
        return compile_launch(kern, args, kw)
    inter, w2 = torch.empty(rows, i, dtype=torch.bfloat16), torch.empty(e, h, i // pack, dtype=wdt)
    ws = torch.empty(e, h, i // g, dtype=sdt)
    b2, tw, part = torch.empty(e, h, dtype=torch.bfloat16), torch.empty(t, k), torch.empty(t * k, h,
                                                                                             dtype=torch.bfloat16)
    args = (inter, w2, ws, b2, tw, ints, ints, ints, part, h, i, e, k, rows // bm, -(-h // bn), inter.stride(0),
            w2.stride(0), w2.stride(1), ws.stride(0), ws.stride(1), b2.stride(0), tw.stride(0), part.stride(0))
    kw = dict(common, ON_INPUT=False, EVEN_K=i % bk == 0)
    return compile_launch(w4ra_w2_sum_kernel if rega else w4ws_w2_sum_kernel if wspec is not None
                          else w4_w2_sum_kernel, args, kw)


def ptxas_report(ptx: str, tmp: Path) -> str:
    """``ptxas -v`` on ``ptx`` for sm_90a (Triton's own ptxas): registers, spills and the C7514 warning (wgmma
    serialised because other instructions touch an in-flight accumulator)."""
    import subprocess

    from triton.backends.nvidia.compiler import get_ptxas

    src = tmp / "k.ptx"
    src.write_text(ptx)
    res = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", str(src), "-o", str(tmp / "k.cubin")],
                         capture_output=True, text=True)
    return res.stdout + res.stderr


def _make(fmt, t, e, k, h, i, act, bias, dtype=torch.bfloat16):
    """Empty (untouched) CPU tensors of the quantised layout of ``fmt`` (None: unquantised)."""
    spec = tq.QuantSpec.of(fmt) if fmt is not None else None
    rows = 2 * i
    if spec is None:
        w13, w2, s13, s2 = torch.empty(e, rows, h, dtype=dtype), torch.empty(e, h, i, dtype=dtype), None, None
    elif spec.fp8:
        w13, w2 = torch.empty(e, rows, h, dtype=torch.float8_e4m3fn), torch.empty(e, h, i, dtype=torch.float8_e4m3fn)
        if spec.code == 1:
            cd = lambda a, b: -(-a // b)  # noqa: E731
            s13 = torch.empty(e, 2 * cd(i, fmt.block_n), cd(h, fmt.block_k))
            s2 = torch.empty(e, cd(h, fmt.block_n), cd(i, fmt.block_k))
        elif fmt.per_tensor:
            s13, s2 = torch.empty(e, 2), torch.empty(e)
        else:
            s13, s2 = torch.empty(e, rows), torch.empty(e, h)
    elif spec.code == 3:
        w13, w2 = torch.empty(e, rows, h // 2, dtype=torch.uint8), torch.empty(e, h, i // 2, dtype=torch.uint8)
        s13, s2 = torch.empty(e, rows, h // 32, dtype=torch.uint8), torch.empty(e, h, i // 32, dtype=torch.uint8)
    else:
        g = fmt.group_size
        w13, w2 = torch.empty(e, rows, h // 8, dtype=torch.int32), torch.empty(e, h, i // 8, dtype=torch.int32)
        s13, s2 = torch.empty(e, rows, h // g, dtype=dtype), torch.empty(e, h, i // g, dtype=dtype)
    x = torch.empty(t, h, dtype=dtype)
    w = torch.empty(t, k)
    ids = torch.zeros(t, k, dtype=torch.int32)
    b1 = torch.empty(e, rows, dtype=dtype) if bias else None
    b2 = torch.empty(e, h, dtype=dtype) if bias else None
    s_in = (torch.ones(e), torch.ones(e)) if getattr(fmt, "static_input", False) else (None, None)
    return x, w13, w2, w, ids, spec, s13, s2, s_in, b1, b2


def launches(fmt, t, shape, dtype=torch.bfloat16, config=None, patch=None, gluon=False):
    """[(kernel, args, kwargs)] of one call of the quantised launcher (heuristic H200 config, or ``config``;
    then ``patch``, e.g. ``{"BLOCK_M": 16, "w13": {"SWAP": 1}}``). ``gluon``: the launcher treats the CPU
    tensors as an sm_90 GPU's, so a config asking for the Gluon kernels launches them (with its own arguments)."""
    e, k, h, i, act, bias = SHAPES[shape] if isinstance(shape, str) else shape
    x, w13, w2, w, ids, spec, s13, s2, (si13, si2), b1, b2 = _make(fmt, t, e, k, h, i, act, bias, dtype)
    cfg = config or tc.heuristic_config(t, e, h, i, k, dtype, 132, quant=spec.key if spec is not None else None)
    cfg = tc.merge_config(cfg, patch)
    seen = []
    kernels = {}
    from moekit.ops._triton import align, combine, epilogue, grouped_gemm, quant, rows

    from moekit.ops import gluon_experts

    mods = [align, combine, epilogue, grouped_gemm, quant, rows]
    if gluon:
        from moekit.ops._gluon import (fp8_w2, fp8_w2_dec, fp8_w2_dec_ws, fp8_w2_ws, fp8_w13, fp8_w13_dec, fp8_w13_ws,
                                       w4, w4_rega, w4_ws)

        mods += [fp8_w2, fp8_w2_dec, fp8_w2_dec_ws, fp8_w2_ws, fp8_w13, fp8_w13_dec, fp8_w13_ws, w4, w4_rega, w4_ws]
    for mod in mods:
        for name in dir(mod):
            obj = getattr(mod, name)
            if isinstance(obj, JITFunction) and hasattr(obj, "warmup"):
                kernels[name] = obj
    saved = {n: kf.__dict__.get("warmup") for n, kf in kernels.items()}
    device_ok, ptx_decode, sm_count = gluon_experts._device_ok, tq._ptx_decode, gluon_experts._sm_count
    if gluon:  # and the packed-bf16 4-bit decode (sm_90+), which the Gluon 4-bit kernels need; an H200's SMs
        gluon_experts._device_ok = lambda t: True
        tq._ptx_decode = lambda d: True
        gluon_experts._sm_count = lambda index: 132
    for name, kf in kernels.items():
        kf.warmup = (lambda kf: lambda *a, grid, **kw: seen.append((kf, a, kw)))(kf)
    try:
        limit = 7.0 if act == "swigluoai" else None
        if spec is None:
            fused_experts_impl(x, w13, w2, w, ids, act, False, b1, b2, None, limit, config=cfg, warmup=True)
        else:
            tq.fused_experts_quant_impl(x, w13, w2, w, ids, spec, s13, s2, si13, si2, act, False, b1, b2, None, limit,
                                        config=cfg, warmup=True)
    finally:
        gluon_experts._device_ok, tq._ptx_decode, gluon_experts._sm_count = device_ok, ptx_decode, sm_count
        for name, kf in kernels.items():
            if saved[name] is None:
                del kf.warmup
            else:
                kf.warmup = saved[name]
    return seen


def compile_gluon_launches(fmt, t, shape, w13: str, w2: str, patch=None) -> None:
    """One call of the launcher with a config asking for the Gluon kernels (the tensors taken for an sm_90 GPU's):
    the Gluon kernels named ``w13`` / ``w2`` replace Triton's ``w13_kernel`` / ``w2_kernel`` and compile with
    exactly the arguments the launcher passes (``AssertionError`` naming the launches otherwise)."""
    seen = launches(fmt, t, shape, patch=patch, gluon=True)
    names = [kf.__name__ for kf, _, _ in seen]
    assert w13 in names and w2 in names, names
    assert "w13_kernel" not in names and "w2_kernel" not in names, names
    for kf, args, kw in seen:
        if kf.__name__ in (w13, w2):
            compile_launch(kf, args, kw)


def sass_text(kernel) -> str:
    """The SASS listing of a compiled kernel (Triton's bundled ``nvdisasm``)."""
    import glob
    import subprocess
    import tempfile

    nvdisasm = glob.glob(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"))[0]
    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        return subprocess.run([nvdisasm, "-c", str(cubin)], capture_output=True, text=True, check=True).stdout


def _parse_sass(sass: str) -> tuple[list[str], dict[str, int]]:
    """(the instructions of a SASS listing, {label: index of the instruction after it})."""
    import re

    ins, labels = [], {}
    for line in sass.splitlines():
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(ins)
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if m:
            ins.append(m.group(1).strip())
    return ins, labels


def _sass_loop(sass: str) -> list[str]:
    """The instructions of the innermost SASS loop that holds every ``HGMMA`` of a listing."""
    import re

    ins, labels = _parse_sass(sass)
    mma = [i for i, s in enumerate(ins) if "HGMMA" in s]
    loop = None
    for i, s in enumerate(ins):  # the backward branch around all of them, the last (innermost enclosing) one
        m = re.search(r"BRA\s+(?:`\()?(\.L_x_\d+)", s)
        if m and m.group(1) in labels and labels[m.group(1)] <= mma[0] and i >= mma[-1]:
            loop = (labels[m.group(1)], i)
    if loop is None:
        raise RuntimeError("no loop around the wgmma instructions")
    return ins[loop[0]:loop[1] + 1]


def inner_loops(kernel, op: str = "GMMA") -> list[list[str]]:
    """The innermost SASS loops of a compiled kernel that hold an instruction containing ``op`` (``GMMA``: the
    wgmmas, a warp-specialised consumer's K loop; ``LDGSTS``: cp.async, a gathering producer's), each as its
    instructions. A barrier's retry stub after the code that branches back into a loop makes a "loop" over the
    rest, EXIT included: not counted."""
    import re

    ins, labels = _parse_sass(sass_text(kernel))
    loops = [(labels[m.group(1)], i) for i, s in enumerate(ins)
             for m in [re.search(r"BRA\s+`?\(?(\.L_x_\d+)", s)] if m and labels.get(m.group(1), i + 1) <= i]
    hit = [(a, b) for a, b in loops
           if any(op in s for s in ins[a:b + 1]) and not any("EXIT" in s for s in ins[a:b + 1])]
    inner = [(a, b) for a, b in hit if not any(a <= a2 and b2 <= b and (a2, b2) != (a, b) for a2, b2 in hit)]
    return [ins[a:b + 1] for a, b in inner]


def _unpredicated(ins: str) -> str:
    """A SASS instruction without its guard predicate (``@P0``, ``@!UP1``)."""
    import re

    return re.sub(r"^@!?U?P\w+\s+", "", ins)


def opcodes(body: list[str]) -> list[str]:
    """The opcodes of SASS instructions (e.g. a loop from :func:`inner_loops`), in order, predicates dropped and
    modifiers kept (``BAR.SYNC.DEFER_BLOCKING``, ``WARPGROUP.DEPBAR.LE``)."""
    return [_unpredicated(s).split()[0] for s in body]


def sass_loop_ops(kernel) -> list[str]:
    """:func:`opcodes` of the innermost SASS loop that holds every wgmma (``HGMMA``) of a compiled kernel."""
    return opcodes(_sass_loop(sass_text(kernel)))


def sass_loop_mix(kernel) -> tuple[int, dict[str, int]]:
    """(instructions, {opcode: count}) of the innermost SASS loop that holds every wgmma (``HGMMA``) of a
    compiled kernel: what one K step issues per thread."""
    import collections

    ops = sass_loop_ops(kernel)
    return len(ops), dict(collections.Counter(o.split(".")[0] for o in ops))


_NO_REG_DEST = ("ST", "BAR", "BRA", "HGMMA", "WARPGROUP", "RED", "ATOM", "LDGSTS", "EXIT", "DEPBAR", "LDGDEPBAR",
                "NOP", "WARPSYNC", "SYNCS", "UTMA", "FENCE", "MEMBAR", "CCTL", "ARRIVES")


def _dest_regs(ins: str) -> list[int]:
    """The general registers an instruction writes (its first operand; 2 / 4 for 64- / 128-bit results)."""
    import re

    s = _unpredicated(ins)
    op = s.split()[0]
    m = re.match(r"\S+\s+R(\d+)\b", s)
    if op.startswith(_NO_REG_DEST) or not m:
        return []
    width = 4 if ".128" in op else 2 if (".64" in op or ".WIDE" in op) else 1
    return list(range(int(m.group(1)), int(m.group(1)) + width))


def inflight_fragment_writes(sass: str) -> list[str]:
    """Instructions of the wgmma loop (run twice, so a step's wgmmas meet the next step's code) that write a
    register holding the A fragment of a register-operand wgmma still in flight. A wgmma group (``HGMMA`` ... up to
    the one marked ``gsb0``) reads its A registers until a ``WARPGROUP.DEPBAR.LE gsb0, n`` leaves at most n younger
    groups; PTX makes touching them before that undefined, and ptxas does not stop its register allocator from
    handing them to later values (round 15: wrong rows on the H200)."""
    import re

    groups, cur, bad = [], set(), []
    body = _sass_loop(sass)
    for rep in range(2):
        for ins in body:
            if "HGMMA" in ins:
                m = re.search(r"HGMMA\.\S+ R\d+, R(\d+),", ins)  # register A (a descriptor A reads shared memory)
                if m:
                    cur |= set(range(int(m.group(1)), int(m.group(1)) + 4))
                if "gsb0" in ins:
                    groups, cur = groups + [cur], set()
                continue
            m = re.search(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x([0-9a-f]+)", ins)
            if m:
                n = int(m.group(1), 16)
                groups = groups[len(groups) - n:] if n else []
                continue
            live = set().union(*groups) if groups else set()
            if rep == 1 and any(r in live for r in _dest_regs(ins)):
                bad.append(ins)
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fmt", default=",".join(f for f in FORMATS if f != "bf16"))
    ap.add_argument("--shape", default="deepseek,gpt-oss")
    ap.add_argument("--t", default="1,64,1000")
    ap.add_argument("--kernels", default="w13_kernel,w2_kernel")
    ap.add_argument("--dump", default=None, help="folder for <fmt>_<shape>_T<t>_<kernel>.{ttgir,ptx}")
    a = ap.parse_args(argv)
    want = set(a.kernels.split(","))
    fails = 0
    for fname in a.fmt.split(","):
        for shape in a.shape.split(","):
            for t in map(int, a.t.split(",")):
                for kf, args, kw in launches(FORMATS[fname], t, shape):
                    if kf.__name__ not in want:
                        continue
                    tag = f"{fname}_{shape}_T{t}_{kf.__name__}"
                    t0 = time.perf_counter()
                    try:
                        res = compile_launch(kf, args, kw)
                    except Exception as exc:  # noqa: BLE001 - report every failing compile
                        fails += 1
                        msg = str(exc).strip().splitlines()
                        print(f"FAIL {tag}: {type(exc).__name__}: {' | '.join(msg[-3:])}")
                        continue
                    irs = res.asm
                    print(f"ok   {tag} ({time.perf_counter() - t0:.1f} s)"
                          f" BM={kw.get('BM')} BN={kw.get('BN')} BK={kw.get('BK')} warps={kw.get('num_warps')}"
                          f" tma={kw.get('USE_TMA')} inline={kw.get('INLINE')}")
                    if a.dump:
                        d = Path(a.dump)
                        d.mkdir(parents=True, exist_ok=True)
                        for ext in ("ttgir", "ptx"):
                            if ext in irs:
                                (d / f"{tag}.{ext}").write_text(irs[ext])
    print(f"{fails} failed")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
