"""The top-k sum as its own pass (config ``"sum_pass"``), after a w2 GEMM that only stores its weighted slot rows:

    out[t, :] = Σ_{k = 0..K-1, slot t·K + k live} part[t·K + k, :]          (fp32, slot order, rounded once)

The fused combine of :func:`.grouped_gemm.w2_kernel` computes the same sum with the same operations (a zero
fp32 accumulator, the live slots' rows added in k order, dead slots adding 0.0, one rounding), so both give the
same bits; this pass only moves the sum out of the GEMM's tail. Tokens whose slots are all dead get a zero row
(as the align kernel writes for the fused combine).

part: [T·K, H] input dtype (fp8 experts and fp16 activations: fp32); out: [T, H]; ids / weights: [T, K] (liveness, as the align).
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


@triton.jit
def combine_tail(part_ptr, sem_ptr, live_ptr, out_ptr, ids_ptr, tw_ptr, map_ptr, loc, tok, valid, offs_n, nmask,
                  pid_n, K, NBN, E_local, E_global, stride_it, stride_twt, stride_pr, stride_ot, BM: tl.constexpr,
                  BN: tl.constexpr, HAS_MAP: tl.constexpr, SKIP_ZERO: tl.constexpr, INLINE: tl.constexpr,
                  SP: tl.constexpr, UPCAST: tl.constexpr):
    """The fused top-k sum of :func:`.grouped_gemm.w2_kernel` (``COMBINE``, its module docstring): after this tile's ``part`` stores, bump the (token, column block)
    semaphores; the program that completes a token sums its K slot rows in slot order and writes ``out``."""
    tok64 = tok.to(tl.int64)
    tl.debug_barrier()  # every thread's part stores precede the release below
    old = tl.atomic_add(sem_ptr + tok64 * NBN + pid_n, 1, mask=valid, sem="acq_rel", scope="gpu")
    if INLINE:
        jj = tl.arange(0, SP)
        need = tl.sum(((jj[None, :] // K == tok[:, None]) & (loc[None, :] >= 0)).to(tl.int32), axis=1)
    else:
        need = tl.load(live_ptr + tok, mask=valid, other=0)
    last = valid & (old == need - 1)
    if tl.max(last.to(tl.int32), axis=0) > 0:
        tl.debug_barrier()  # the acquiring atomics precede every thread's loads below
        total = tl.zeros([BM, BN], dtype=tl.float32)
        for k2 in range(0, K):
            loc2 = slot_local_expert(
                ids_ptr, tw_ptr, map_ptr, tok, k2, last, stride_it, stride_twt, E_local, E_global,
                HAS_MAP, SKIP_ZERO,
            )
            live2 = last & (loc2 >= 0)
            q_ptrs = part_ptr + (tok64 * K + k2)[:, None] * stride_pr + offs_n[None, :]
            v = tl.load(q_ptrs, mask=live2[:, None] & nmask[None, :], other=0.0, cache_modifier=".cg")
            total += v.to(tl.float32)
        o_ptrs = out_ptr + tok64[:, None] * stride_ot + offs_n[None, :]
        tl.store(o_ptrs, to_dt(total, out_ptr.dtype.element_ty, UPCAST), mask=last[:, None] & nmask[None, :])
