"""Zero (identity) experts and the routed output's final scaling on Triton (``@triton.jit`` only; launchers in
:mod:`moekit.ops.triton_zero`, the math and torch twins in :mod:`moekit.ops.zero_experts`).

    zero_slots_kernel:   s[t] = Σ_{j: ids[t, j] >= E} w[t, j]  (float32, slot order j = 0, 1, ...);
                         zero slots -> id 0, weight 0.0                                      grid (T,)
    zero_combine_kernel: out[t, :] = ((routed[t, :] + x[t, :] · s[t]) · scale)  in float32, rounded once to out's
                         dtype (launched without fp fusion: the product rounds before the add, as in the twin)
                                                                                             grid (T, ⌈H / BH⌉)
"""

import triton
import triton.language as tl

from .quant import to_dt


@triton.jit
def zero_slots_kernel(w_ptr, ids_ptr, w_out_ptr, ids_out_ptr, s_ptr, K, E,
                      stride_w, stride_ids, stride_wo, stride_io, KP: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    s = tl.zeros((), dtype=tl.float32)
    for j in tl.static_range(KP):  # the twin's order: one slot after the other (exact, not a tree)
        if j < K:
            wj = tl.load(w_ptr + t * stride_w + j)
            s += tl.where(tl.load(ids_ptr + t * stride_ids + j) >= E, wj, 0.0)
    tl.store(s_ptr + t, s)
    kk = tl.arange(0, KP)
    km = kk < K
    ids = tl.load(ids_ptr + t * stride_ids + kk, mask=km, other=0)
    w = tl.load(w_ptr + t * stride_w + kk, mask=km, other=0.0)
    zero_slot = ids >= E
    tl.store(w_out_ptr + t * stride_wo + kk, tl.where(zero_slot, 0.0, w), mask=km)
    tl.store(ids_out_ptr + t * stride_io + kk, tl.where(zero_slot, 0, ids), mask=km)


@triton.jit
def zero_combine_kernel(r_ptr, x_ptr, s_ptr, out_ptr, H, scale, stride_r, stride_x, stride_o,
                        HAS_ZERO: tl.constexpr, BH: tl.constexpr, INTERP: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
    cm = cols < H
    acc = tl.load(r_ptr + t * stride_r + cols, mask=cm, other=0.0).to(tl.float32)
    if HAS_ZERO:
        x = tl.load(x_ptr + t * stride_x + cols, mask=cm, other=0.0).to(tl.float32)
        acc = acc + x * tl.load(s_ptr + t)
    acc = acc * scale
    tl.store(out_ptr + t * stride_o + cols, to_dt(acc, out_ptr.dtype.element_ty, INTERP), mask=cm)
