"""Zero (identity) experts and the routed output's final scaling on Triton (``@triton.jit`` only; launchers in
:mod:`moekit.ops.triton_zero`, the math and torch twins in :mod:`moekit.ops.zero_experts`).

    zero_slots_kernel:   s[t] = Σ_{j: ids[t, j] >= E} w[t, j]  (float32, slot order j = 0, 1, ...)
                         zero[t, :] = x[t, :] · s[t]  (float32);  zero slots -> id 0, weight 0.0
    zero_combine_kernel: out[t, :] = ((routed[t, :] + zero[t, :]) · scale)  rounded once to out's dtype

Grid: (T, ⌈H / BH⌉). The row's K slots are read by every column block; only block 0 writes the masked slots.
"""

import triton
import triton.language as tl

from .quant import to_dt


@triton.jit
def zero_slots_kernel(x_ptr, w_ptr, ids_ptr, w_out_ptr, ids_out_ptr, zero_ptr, H, K, E,
                      stride_x, stride_w, stride_ids, stride_wo, stride_io, stride_z,
                      KP: tl.constexpr, BH: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    s = tl.zeros((), dtype=tl.float32)
    for j in tl.static_range(KP):  # the twin's order: one slot after the other (exact, not a tree)
        if j < K:
            wj = tl.load(w_ptr + t * stride_w + j)
            s += tl.where(tl.load(ids_ptr + t * stride_ids + j) >= E, wj, 0.0)
    if hb == 0:
        kk = tl.arange(0, KP)
        km = kk < K
        ids = tl.load(ids_ptr + t * stride_ids + kk, mask=km, other=0)
        w = tl.load(w_ptr + t * stride_w + kk, mask=km, other=0.0)
        zero_slot = ids >= E
        tl.store(w_out_ptr + t * stride_wo + kk, tl.where(zero_slot, 0.0, w), mask=km)
        tl.store(ids_out_ptr + t * stride_io + kk, tl.where(zero_slot, 0, ids), mask=km)
    cols = hb * BH + tl.arange(0, BH)
    cm = cols < H
    x = tl.load(x_ptr + t * stride_x + cols, mask=cm, other=0.0).to(tl.float32)
    tl.store(zero_ptr + t * stride_z + cols, x * s, mask=cm)


@triton.jit
def zero_combine_kernel(r_ptr, z_ptr, out_ptr, H, scale, stride_r, stride_z, stride_o,
                        HAS_ZERO: tl.constexpr, BH: tl.constexpr, INTERP: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
    cm = cols < H
    acc = tl.load(r_ptr + t * stride_r + cols, mask=cm, other=0.0).to(tl.float32)
    if HAS_ZERO:
        acc = acc + tl.load(z_ptr + t * stride_z + cols, mask=cm, other=0.0)
    acc = acc * scale
    tl.store(out_ptr + t * stride_o + cols, to_dt(acc, out_ptr.dtype.element_ty, INTERP), mask=cm)
