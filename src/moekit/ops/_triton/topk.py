"""Fused routing: scores -> (grouped, biased) top-k -> weights, one program per token.

The row of ``E`` logits is held in registers as a ``[GP, EGP]`` tile (group ``g``, member ``j``,
expert id ``g·EG + j``; ungrouped routing is ``G = 1``), so ``E`` up to a few thousand fits.

Selection works on an int32 key with the float order (``_orderable``) packed with the expert id into
one int64, so that a single max-reduction returns the best score and, among equal scores, the
lowest expert id (the SPEC's tie rule).

NaN policy: for the selection a NaN logit, or a NaN selection score, is treated as ``-inf`` —
consistently in the scores, the group scores and the selection — so the kernel always returns K
distinct ids in ``[0, E)``; and a row holding a NaN logit gets NaN weights (all K), so that the NaN
reaches the token's output instead of being routed around (a NaN hidden state under sigmoid scoring
used to come out as exactly 0); so does every row where the selection bias holds a NaN (round 63: an
in-place update of the bias to NaN routed around that expert silently). Weights computed from infinite
logits may be NaN/inf too (softmax of a row holding ``+inf``), visibly. The validating torch path raises ``ValueError`` on non-finite logits.
"""

from __future__ import annotations

import triton
import triton.language as tl

SCORE_CODES = {"softmax": 0, "sigmoid": 1, "sqrtsoftplus": 2}


@triton.jit
def _orderable(x):
    """fp32 -> int32 with the same order; NaN maps as -inf, -0.0 as +0.0."""
    x = tl.where(x != x, float("-inf"), x)
    x = tl.where(x == 0.0, 0.0, x)
    i = x.to(tl.int32, bitcast=True)
    return tl.where(i < 0, i ^ 0x7FFFFFFF, i)


@triton.jit
def _scores(x, valid, SCORING: tl.constexpr):
    """fp32 scores of logits ``x`` (masked lanes hold -inf)."""
    if SCORING == 0:
        mx = tl.max(tl.max(x, 1), 0)
        p = tl.where(valid, tl.exp(x - mx), 0.0)
        return p / tl.sum(tl.sum(p, 1), 0)
    if SCORING == 1:  # exp of -|x|: 1 / (1 + e^-x) overflowed below x = -88.7 (scores 0, a renormalised row lost)
        z = tl.exp(-tl.abs(x))
        return tl.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))
    z = tl.exp(x)  # sqrt(softplus(x)), softplus = x above 20 as in torch, else an accurate log1p
    u = 1.0 + z
    lp = tl.where(u == 1.0, z, tl.log(u) * (z / (u - 1.0)))
    return tl.sqrt(tl.where(x > 20.0, x, lp))


@triton.jit
def route_kernel(
    logits_ptr, bias_ptr, w_out_ptr, ids_out_ptr,
    K, EG, G, TOPK_GROUP, scale,
    stride_lt, stride_wt, stride_it,
    GP: tl.constexpr, EGP: tl.constexpr, KP: tl.constexpr, SCORING: tl.constexpr,
    HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr, RENORM: tl.constexpr, TRIGGER: tl.constexpr = False,
):
    """Grid (T,). logits: [T, E] any float; bias: [E]; w_out: [T, K] f32; ids_out: [T, K] int.

    ``TRIGGER`` (compiled on sm_90+): ``griddepcontrol.launch_dependents`` first, so that a launch after this one made
    as a programmatic dependent (the experts' input quantiser) is scheduled while the routing runs. That launch's
    programs wait for this grid to complete before they read or write anything (the PDL contract: a dependent that
    does not wait reads nothing of its primary), so the trigger's place changes no value."""
    if TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()
    t = tl.program_id(0).to(tl.int64)
    gi = tl.arange(0, GP)[:, None]
    ji = tl.arange(0, EGP)[None, :]
    eid = gi * EG + ji
    valid = (gi < G) & (ji < EG)
    x = tl.load(logits_ptr + t * stride_lt + eid, mask=valid, other=float("-inf")).to(tl.float32)
    row_nan = tl.max(tl.max((x != x).to(tl.int32), 1), 0) > 0  # masked lanes hold -inf, never NaN
    x = tl.where(x != x, float("-inf"), x)
    s = _scores(x, valid, SCORING)
    if HAS_BIAS:  # a NaN in the selection bias: every row's weights NaN (round 63: the expert was routed around)
        b = tl.load(bias_ptr + eid, mask=valid, other=0.0).to(tl.float32)
        row_nan = row_nan | (tl.max(tl.max((b != b).to(tl.int32), 1), 0) > 0)
        sel = s + b
    else:
        sel = s
    sel = tl.where(valid & (sel == sel), sel, float("-inf"))
    neg_inf_key = _orderable(tl.full([1, 1], float("-inf"), tl.float32))
    taken = tl.full([1, 1], -2147483648, tl.int64) << 32  # below every packed key
    key = tl.where(valid, _orderable(sel), -2147483648)
    if GROUPED:
        m1 = tl.max(sel, 1)
        first = tl.min(tl.where(sel == m1[:, None], ji, EGP), 1)
        second = tl.max(tl.where(ji == first[:, None], float("-inf"), sel), 1)
        if HAS_BIAS:
            gscore = tl.where(EG >= 2, m1 + second, m1)
        else:
            gscore = m1
        g1 = tl.arange(0, GP)
        gkey = tl.where(g1 < G, _orderable(gscore), -2147483648)
        gpack = (gkey.to(tl.int64) << 32) + (GP - g1).to(tl.int64)
        kept = g1 < 0
        for _ in range(0, TOPK_GROUP):
            best = tl.max(gpack, 0)
            gid = GP - (best - ((best >> 32) << 32)).to(tl.int32)
            kept = kept | (g1 == gid)
            gpack = tl.where(g1 == gid, tl.reshape(taken, [1]), gpack)
        key = tl.where(kept[:, None], key, tl.where(valid, neg_inf_key, -2147483648))
    pack = (key.to(tl.int64) << 32) + (2147483647 - eid).to(tl.int64)
    kr = tl.arange(0, KP)
    ids = tl.zeros([KP], dtype=tl.int32)
    for j in range(0, K):
        best = tl.max(tl.max(pack, 1), 0)
        idx = 2147483647 - (best - ((best >> 32) << 32)).to(tl.int32)
        ids = tl.where(kr == j, idx, ids)
        pack = tl.where(eid == idx, taken, pack)
    # weights from the unbiased scores at the chosen ids: recompute them from the logits
    kmask = kr < K
    xs = tl.load(logits_ptr + t * stride_lt + ids, mask=kmask, other=0.0).to(tl.float32)
    xs = tl.where(xs != xs, float("-inf"), xs)
    if SCORING == 0:
        mx = tl.max(tl.max(x, 1), 0)
        den = tl.sum(tl.sum(tl.where(valid, tl.exp(x - mx), 0.0), 1), 0)
        w = tl.exp(xs - mx) / den
    else:
        w = tl.sum(_scores(xs[:, None], kmask[:, None], SCORING), 1)
    w = tl.where(kmask, w, 0.0)
    if RENORM:
        total = tl.sum(w, 0)
        w = w / tl.where(total > 0, total, 1.0)  # as routing.finish_weights: only an all-zero top-k is guarded
    w = tl.where(row_nan, float("nan"), w * scale)
    tl.store(w_out_ptr + t * stride_wt + kr, w, mask=kmask)
    tl.store(ids_out_ptr + t * stride_it + kr, ids.to(ids_out_ptr.dtype.element_ty), mask=kmask)
