"""The w13 epilogue's activation (fp32, switched on the activation registry's codes), shared by the Triton and
Gluon GEMMs, and :func:`act_pass_kernel`: that epilogue as its own pass after a ``SPLIT`` w13
(:mod:`.grouped_gemm`)."""

from __future__ import annotations

import triton
import triton.language as tl

from ..activation import SOFTCAP_GATE, SOFTCAP_UP, SWIGLUOAI_ALPHA, get_activation
from .quant import requant_store, to_dt

# the ACT codes of the activation registry (:mod:`moekit.ops.activation`), as constexpr globals
SILU = tl.constexpr(get_activation("silu").code)
GELU = tl.constexpr(get_activation("gelu").code)
GELU_TANH = tl.constexpr(get_activation("gelu_tanh").code)
RELU2 = tl.constexpr(get_activation("relu2").code)
SILU_POST_CLAMP = tl.constexpr(get_activation("silu_post_clamp").code)
SOFTCAP_SWIGLU = tl.constexpr(get_activation("softcap_swiglu").code)
OAI_ALPHA = tl.constexpr(SWIGLUOAI_ALPHA)
CAP_G = tl.constexpr(SOFTCAP_GATE)
CAP_U = tl.constexpr(SOFTCAP_UP)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def activate(g, u, limit, ACT: tl.constexpr, HAS_LIMIT: tl.constexpr):
    """fp32 epilogue: gated act(g, u), or relu(g)² for relu2 (``u`` unused). ``ACT``: a registry code."""
    if ACT == RELU2:
        r = tl.maximum(g, 0.0)
        return r * r
    if ACT == SOFTCAP_SWIGLU:  # c·tanh(x/c) = c·(2·sigmoid(2x/c) - 1)
        gc = (2.0 * _sigmoid(2.0 * g / CAP_G) - 1.0) * CAP_G
        uc = (2.0 * _sigmoid(2.0 * u / CAP_U) - 1.0) * CAP_U
        return gc * _sigmoid(g) * uc
    if ACT == SILU_POST_CLAMP:  # min(silu(g), L) · clamp(u, ±L)
        s = g * _sigmoid(g)
        if HAS_LIMIT:
            s = tl.minimum(s, limit)
            u = tl.minimum(tl.maximum(u, -limit), limit)
        return s * u
    if HAS_LIMIT:
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
    if ACT == SILU:
        return g * _sigmoid(g) * u
    if ACT == GELU:
        return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476)) * u
    if ACT == GELU_TANH:  # 0.5 g (1 + tanh(y)) == g · sigmoid(2y), y = sqrt(2/pi) (g + 0.044715 g³)
        y = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return g * _sigmoid(2.0 * y) * u
    # swigluoai, the one code left: (u + 1) · (g · sigmoid(α g)), transformers' order. Round 51: ((u + 1) · g) · σ
    # overflowed to -inf for g < -4e37 (|u + 1| up to 8 under the limit) and -inf · 0 gave NaN where the value is 0
    return (u + 1.0) * (g * _sigmoid(g * OAI_ALPHA))


@triton.jit
def act_pass_kernel(h_ptr, inter_ptr, is_ptr, qs_ptr, out_ptr, I, limit, stride_hr, stride_ir, stride_isr,
                    ACT: tl.constexpr, HAS_LIMIT: tl.constexpr, REQ: tl.constexpr,
                    UE8M0: tl.constexpr, BLOCK: tl.constexpr, INTERP: tl.constexpr):
    """The w13 epilogue after a ``SPLIT`` w13: ``inter[r, n] = act(h[r, n], h[r, I + n])`` (fp32), rounded to
    the params dtype (``out_ptr``'s, the layer output's: not read) and stored, or quantised for w2 (``REQ`` 1: one
    group per program, BLOCK = the group, scale at ``is[r, pid_1]``; 2: the static ``*qs_ptr``) exactly as
    :func:`.grouped_gemm.w13_kernel`'s fused epilogue.
    Grid (rows, cdiv(I, BLOCK)); h: [rows, 2I] fp32."""
    r = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    offs = cb * BLOCK + tl.arange(0, BLOCK)
    m = offs < I
    g = tl.load(h_ptr + r * stride_hr + offs, mask=m, other=0.0)[None, :]
    u = tl.load(h_ptr + r * stride_hr + I + offs, mask=m, other=0.0)[None, :]
    h = activate(g, u, limit, ACT, HAS_LIMIT)
    out_ptrs = inter_ptr + r * stride_ir + offs[None, :]
    DT: tl.constexpr = out_ptr.dtype.element_ty
    if REQ > 0:
        one = tl.full([1], 0, tl.int64)
        requant_store(h, out_ptrs, m[None, :], is_ptr, one + r * stride_isr + cb, one == 0, qs_ptr, m, DT, REQ,
                      UE8M0, INTERP)
    else:
        tl.store(out_ptrs, to_dt(h, DT, INTERP), mask=m[None, :])
