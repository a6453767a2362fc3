"""The packed 4-bit GEMMs' ring (Gluon; :mod:`.w4`, :mod:`.w4_rega`, :mod:`.w4_ws`): the tile layouts, the pointers to
a tile's packed rows and group scales, and each K step's ``cp.async`` copies of the activation rows and packed weight
rows into ring slot ``k % STAGES`` (16-byte vectors; the K tail masked in whole vectors, or, for re-laid rows that
end in a half chunk, the last step's half chunk copied to a whole chunk's places: :func:`_half_tail`, round 45).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy

from .._triton.quant import MXFP4
from .compat import cp_async_load

_PLAIN = gl.constexpr(gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))  # the packed ring: each thread reads its own copies


@gluon.constexpr_function
def _pack(QUANT):
    """Values per packed element: two e2m1 codes per uint8 (mxfp4), eight int4 per int32."""
    return 2 if QUANT == MXFP4 else 8


@gluon.constexpr_function
def _p_layout(QUANT, G, BK, num_warps):
    """The packed tile [BN, BK / G groups, G / PACK elements]: 16 bytes (32 // PACK elements) per thread."""
    pack = 2 if QUANT == MXFP4 else 8
    ng, w, vec = BK // G, G // pack, 32 // pack
    return gl.BlockedLayout([1, 1, vec], [32 // (ng * (w // vec)), ng, w // vec], [num_warps, 1, 1], [2, 1, 0])


@gluon.constexpr_function
def _a_layout(BK, num_warps):
    """Activation rows [BM, BK] for cp.async: 8 bf16 (16 bytes) per thread."""
    return gl.BlockedLayout([1, 8], [32 // (BK // 8), BK // 8], [num_warps, 1], [1, 0])


@gluon.jit
def _w_ptrs(w_base, n0, N, stride_wn, NG: gl.constexpr, W: gl.constexpr, VEC: gl.constexpr, P_L: gl.constexpr,
            BN: gl.constexpr):
    """Pointers [BN, NG, W] to packed rows n0..n0+BN at k = 0, the row mask, and each element's vector index
    along the row (for the K-tail mask in whole 16-byte vectors)."""
    n = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, P_L)))
    g = gl.arange(0, NG, layout=gl.SliceLayout(0, gl.SliceLayout(2, P_L)))
    w = gl.arange(0, W, layout=gl.SliceLayout(0, gl.SliceLayout(1, P_L)))
    n3 = gl.expand_dims(gl.expand_dims(n, 1), 2)
    e3 = gl.expand_dims(gl.expand_dims(g, 0), 2) * W + gl.expand_dims(gl.expand_dims(w, 0), 1)
    # every packed row starts 16-byte aligned (the launcher checked): said here, on the product, so the copies
    # stay 16-byte vectors when the row stride is no multiple of 16 (gpt-oss int4: 360 words)
    row = gl.multiple_of(n3.to(gl.int64) * stride_wn, [VEC, VEC, VEC])
    ptrs = w_base + row + e3
    return ptrs, n3 < N, e3 // VEC


@gluon.jit
def _s_ptrs(ws_base, n0, N, stride_wsn, NG: gl.constexpr, P_L: gl.constexpr, BN: gl.constexpr):
    """Pointers [BN, NG] to the rows' group scales at k = 0 (the packed tile's scale layout) and the row mask."""
    S_L: gl.constexpr = gl.SliceLayout(2, P_L)
    n = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, S_L))
    g = gl.arange(0, NG, layout=gl.SliceLayout(0, S_L))
    return ws_base + n.to(gl.int64)[:, None] * stride_wsn + g[None, :], (n < N)[:, None], g[None, :]


@gluon.jit
def _scales(s_ptrs, s_mask, g2, k, NKG, NG: gl.constexpr):
    """Raw scales of K step ``k`` ([BN, NG]; 0 past K, as the Triton kernels' ``load_w_scales``)."""
    return gl.load(s_ptrs + k * NG, mask=s_mask & (k * NG + g2 < NKG), other=0)


@gluon.jit
def _issue_x(x_smem, x_ptrs, x_mask, offs_v, Kx, k, nk, STAGES: gl.constexpr, BK: gl.constexpr,
             EVEN_K: gl.constexpr):
    """The activation rows of K step ``k`` into ring slot ``k % STAGES`` (cp.async, 16-byte vectors)."""
    if k < nk:
        if EVEN_K:
            m = x_mask
        else:
            m = x_mask & (offs_v < (Kx - k * BK) // 8)
        cp_async_load(x_smem.index(k % STAGES), x_ptrs + k * BK, mask=m)


@gluon.jit
def _half_tail(P_L: gl.constexpr, NG: gl.constexpr, W: gl.constexpr, VEC: gl.constexpr):
    """For re-laid words whose rows end in a half chunk (:mod:`..w4_layout`): the offset [1, NG, W] from each
    element of a whole K step's slot to where the half chunk holds it (lane q = e // VEC keeps its first VEC / 2
    elements, at q · VEC / 2), and which elements it holds (:func:`..w4_layout.half_tail_src`)."""
    g = gl.arange(0, NG, layout=gl.SliceLayout(0, gl.SliceLayout(2, P_L)))
    w = gl.arange(0, W, layout=gl.SliceLayout(0, gl.SliceLayout(1, P_L)))
    e3 = gl.expand_dims(gl.expand_dims(g, 0), 2) * W + gl.expand_dims(gl.expand_dims(w, 0), 1)
    return -(e3 // VEC) * (VEC // 2), (e3 // (VEC // 2)) % 2 == 0


@gluon.jit
def _issue_w(p_smem, j, w_ptrs, w_mask, vid, KP, k, nk, BK: gl.constexpr, PACK: gl.constexpr,
             EVEN_K: gl.constexpr, HALF: gl.constexpr = False, t_delta=None, t_keep=None):
    """One packed weight tile of K step ``k`` into ring buffer ``j`` (cp.async, 16-byte vectors of 32 // PACK
    elements). ``HALF`` (re-laid words, K ending in a half chunk): the last step copies the half chunk to where a
    whole chunk holds its elements (``t_delta`` / ``t_keep`` of :func:`_half_tail`; 8-byte vectors), the rest zero;
    every other step is whole."""
    if k < nk:
        if EVEN_K:
            cp_async_load(p_smem.index(j), w_ptrs + k * (BK // PACK), mask=w_mask)
        elif HALF:
            if k == nk - 1:
                cp_async_load(p_smem.index(j), w_ptrs + k * (BK // PACK) + t_delta, mask=w_mask & t_keep)
            else:
                cp_async_load(p_smem.index(j), w_ptrs + k * (BK // PACK), mask=w_mask)
        else:
            m = w_mask & (vid < (KP - k * (BK // PACK)) // (32 // PACK))
            cp_async_load(p_smem.index(j), w_ptrs + k * (BK // PACK), mask=m)


@gluon.jit
def _issue_step(x_smem, p_smem, x_ptrs, x_mask, offs_v, Kx, w_ptrs, u_ptrs, w_mask, vid, KP, k, nk,
                STAGES: gl.constexpr, BK: gl.constexpr, PACK: gl.constexpr, EVEN_K: gl.constexpr, NT: gl.constexpr,
                HALF: gl.constexpr = False, t_delta=None, t_keep=None):
    """All of K step ``k``'s copies into ring slot ``k % STAGES``, one commit group: the activation rows, then
    ``NT`` packed weight tiles (w13: the gate rows at ``w_ptrs``, the up rows at ``u_ptrs``; w2: one); ``HALF``,
    ``t_delta``, ``t_keep``: :func:`_issue_w`'s."""
    _issue_x(x_smem, x_ptrs, x_mask, offs_v, Kx, k, nk, STAGES, BK, EVEN_K)
    _issue_w(p_smem, NT * (k % STAGES), w_ptrs, w_mask, vid, KP, k, nk, BK, PACK, EVEN_K, HALF, t_delta, t_keep)
    if NT == 2:
        _issue_w(p_smem, 2 * (k % STAGES) + 1, u_ptrs, w_mask, vid, KP, k, nk, BK, PACK, EVEN_K, HALF, t_delta,
                 t_keep)
    async_copy.commit_group()
