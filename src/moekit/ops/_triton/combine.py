"""The top-k sum as its own pass (config ``"sum_pass"``), after a w2 GEMM that only stores its weighted slot rows:

    out[t, :] = Σ_{k = 0..K-1, slot t·K + k live} part[t·K + k, :]          (fp32, slot order, rounded once)

The fused combine of :func:`.grouped_gemm.w2_kernel` computes the same sum with the same operations (a zero
fp32 accumulator, the live slots' rows added in k order, dead slots adding 0.0, one rounding), so both give the
same bits; this pass only moves the sum out of the GEMM's tail. Tokens whose slots are all dead get a zero row
(as the align kernel writes for the fused combine).

part: [T·K, H] input dtype (fp8 experts: fp32); out: [T, H]; ids / weights: [T, K] (liveness, as the align).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .align import slot_local_expert
from .quant import to_dt


@triton.jit
def sum_slots_kernel(
    part_ptr, out_ptr, ids_ptr, tw_ptr, map_ptr, T, K, H, E_local, E_global,
    stride_pr, stride_ot, stride_it, stride_twt,
    BH: tl.constexpr, HAS_MAP: tl.constexpr, SKIP_ZERO: tl.constexpr, INTERP: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Grid (T, cdiv(H, BH)): one token's BH output columns per program. ``PDL``: launched as a programmatic
    dependent launch after the w2 GEMM; wait for that grid first."""
    if PDL:
        tl.extra.cuda.gdc_wait()
    tok = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BH + tl.arange(0, BH)
    hmask = h < H
    total = tl.zeros([BH], dtype=tl.float32)
    for k in range(0, K):
        loc = slot_local_expert(ids_ptr, tw_ptr, map_ptr, tok, k, tok < T, stride_it, stride_twt, E_local,
                                E_global, HAS_MAP, SKIP_ZERO)
        v = tl.load(part_ptr + (tok * K + k) * stride_pr + h, mask=hmask & (loc >= 0), other=0.0)
        total += v.to(tl.float32)
    tl.store(out_ptr + tok * stride_ot + h, to_dt(total, out_ptr.dtype.element_ty, INTERP), mask=hmask)
