"""The small align and the fp8 block input quantiser in one launch (decode and small batches).

At ``16 < T·K <= 1024`` slots an fp8 block experts step begins with two independent kernels of a few µs each: the
one-program align (:func:`.align.align_small`: count, scan, scatter of the slots) and the layer input's quantiser
(:func:`.quant.quant_pairs`: per token and group of ``G`` columns). Here program 0 does the align and programs
``1 .. n`` the quantiser's pairs, as their own kernels would: the same stores, so the same bits, one launch fewer.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .align import align_small
from .quant import quant_pairs


@triton.jit
def align_quant_small_kernel(
    ids_ptr, w_ptr, map_ptr, counts_ptr, loc_ptr, rank_ptr, live_ptr, sem_ptr, out_ptr, row_start_ptr,
    sorted_ptr, T, K, H, E_local, E_global, NBN, stride_it, stride_wt, stride_ot,
    x_ptr, q_ptr, s_ptr, tw_ptr, QK, R, stride_xt, stride_qt, stride_st, stride_twt,
    BM: tl.constexpr, BLOCK_E: tl.constexpr, BT: tl.constexpr, KP: tl.constexpr, ZB: tl.constexpr,
    BH: tl.constexpr, HAS_MAP: tl.constexpr, SKIP_ZERO: tl.constexpr, COMBINE: tl.constexpr,
    G: tl.constexpr, GP: tl.constexpr, UE8M0: tl.constexpr, ON_INPUT: tl.constexpr, INTERP: tl.constexpr,
    TAIL: tl.constexpr = 0,
):
    """Grid (1 + cdiv(R·⌈QK/G⌉, GP),): program 0 :func:`.align.align_small_kernel`'s work (its arguments first),
    the others :func:`.quant.act_quant_kernel`'s ``MODE`` 0 over ``x [R, QK]`` (its arguments next; ``GP`` pairs per
    program)."""
    pid = tl.program_id(0)
    if pid == 0:
        align_small(
            ids_ptr, w_ptr, map_ptr, counts_ptr, loc_ptr, rank_ptr, live_ptr, sem_ptr, out_ptr, row_start_ptr,
            sorted_ptr, T, K, H, E_local, E_global, NBN, stride_it, stride_wt, stride_ot,
            BM, BLOCK_E, BT, KP, ZB, BH, HAS_MAP, SKIP_ZERO, COMBINE, TAIL,
        )
    else:
        quant_pairs(pid - 1, x_ptr, q_ptr, s_ptr, tw_ptr, QK, R, stride_xt, stride_qt, stride_st, stride_twt,
                    G, GP, UE8M0, ON_INPUT, INTERP, False, x_ptr, x_ptr, x_ptr)
