"""Triton routed experts: the Triton kernel table's ``experts`` (math in :mod:`.experts`).

    fused_experts_triton -> torch.ops.moekit.fused_experts (custom op, registered here)
                         -> fused_experts_impl (launcher) -> align / grouped_gemm kernels

Pipeline per chunk of tokens (no host synchronisation anywhere: CUDA-graph capturable)::

    align    (1 launch for T·K <= SMALL_SLOTS, else memset + count + scatter)
             -> counts [E_local], sorted_slot [rows] (per-expert blocks of BLOCK_M rows, padded)
    w13 GEMM -> inter [rows, I] = act(x[tok] · w13[e]ᵀ + b13[e])   (input dtype)
    w2 GEMM  -> out [T, H]: weighted, top-k summed in slot order (deterministic): in the GEMM's tail, or
             by a sum pass over the stored slot rows (T·K >= triton_plan.SUM_PASS_SLOTS, or config "sum_pass";
             the same bits)

Same semantics and output as :func:`~moekit.ops.experts.experts_reference` within the SPEC
tolerances; precision notes in :mod:`moekit.ops._triton.grouped_gemm`. Tokens run in chunks so that
the scratch stays under ``workspace_bytes`` (each token lies in one chunk: chunking is exact).
Ids outside ``[0, E)`` are treated as dead slots (they add 0) instead of raising: the check would be
a host synchronisation; the torch path checks them. Inputs are validated by the callers
(:func:`moekit.ops.api.fused_experts`, or a layer at construction).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton

from ._device import KERNEL_OPTIONS, interpreting as _interpreting, major as _major, pdl_ok as _pdl_ok
from ._eager import direct_call_ok, unit_rows
from . import gluon_experts, gluon_w4
from ._triton import align, combine as combine_k, epilogue, grouped_gemm, rows as rows_k
from .activation import effective_limit, get_activation
from .config_keys import check_config
from .experts import chunk_tokens
from .triton_configs import get_config
from .triton_plan import _freeze, launch_plan

#: upper bound on the scratch of one chunk (inter + combine buffers), bytes. 6 GiB holds DeepSeek-V3 fp8 block at
#: T = 16384 in one chunk (~302 KB per token, 80 % of it the fp32 slot rows): every chunk streams every expert's
#: weights, and one chunk instead of two measured 19928 -> 18840 µs on the H200 (round 28, chunk_probe.py).
#: bf16 DeepSeek-V3 fits ~44K tokens. (vLLM's default 32K-token chunk of that shape holds ~6 GB of caches.)
DEFAULT_WORKSPACE_BYTES = 6 * 1024**3
#: at most this many slots (T·K) per chunk use the single-launch align kernel (one program walks all slots;
#: count + scatter runs a program per tile). H200 µs single / count + scatter (+ memset), kernel_profile.py
#: --small-slots: Qwen3 (E = 128) 128 slots 4.2 / 5.3, 1024: 9.2 / 9.4, 2048: 16.4 / 9.4, 8192: 63.6 / 10.5;
#: Mixtral (E = 8: no atomic contention) 1024: 8.9 / 9.8, 2048: 15.9 / 9.8, 8192: 60.2 / 11.0
SMALL_SLOTS = 1024
#: at most this many slots skip the align kernel: the GEMMs derive the layout in registers (decode).
#: Measured on H100: a win at T·K <= 16 (Qwen3 T=1: 42.4 -> 40.6 µs), a loss at 64 (DeepSeek T=8:
#: 1552 -> 1682 µs: every GEMM program redoes an [S, S] rank computation)
INLINE_SLOTS = 16


def fused_experts_triton(
    x, w1, w2, topk_weights, topk_ids, *, activation="silu", apply_router_weight_on_input=False,
    w1_bias=None, w2_bias=None, expert_map=None, swiglu_limit=None,
) -> torch.Tensor:
    """Routed experts on the Triton kernels (the ``moekit::fused_experts`` custom op when traced).

    x: [T, H] fp32/bf16/fp16; w1: [E_local, 2I | I, H]; w2: [E_local, H, I]; topk_weights: [T, K] float;
    topk_ids: [T, K] int32/int64; w1_bias: [E_local, 2I | I]; w2_bias: [E_local, H];
    expert_map: [E] int32 (-1: not on this rank). returns: [T, H] dtype of x.
    """
    b1, b2, emap = (None if t is None else t.contiguous() for t in (w1_bias, w2_bias, expert_map))
    # eagerly the launcher is called directly (same kernels, no dispatcher round trip: see ._eager);
    # torch.compile, fake tensors and dispatch modes go through the op
    fn = fused_experts_impl if direct_call_ok(x) else fused_experts_op
    return fn(
        x.contiguous(), w1.contiguous(), w2.contiguous(), topk_weights.contiguous(), topk_ids.contiguous(),
        get_activation(activation).name, bool(apply_router_weight_on_input), b1, b2, emap,
        None if swiglu_limit is None else float(swiglu_limit),
    )


@torch.library.custom_op("moekit::fused_experts", mutates_args=())
def fused_experts_op(
    hidden_states: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str,
    apply_router_weight_on_input: bool,
    w1_bias: Optional[torch.Tensor],
    w2_bias: Optional[torch.Tensor],
    expert_map: Optional[torch.Tensor],
    swiglu_limit: Optional[float],
) -> torch.Tensor:
    """``torch.library`` op around :func:`fused_experts_impl`, so that torch.compile(fullgraph=True)
    traces through it and CUDA graphs capture it."""
    hidden_states, w1, w2, topk_weights, topk_ids, w1_bias, w2_bias, expert_map = unit_rows(
        hidden_states, w1, w2, topk_weights, topk_ids, w1_bias, w2_bias, expert_map)
    return fused_experts_impl(
        hidden_states, w1, w2, topk_weights, topk_ids, activation, apply_router_weight_on_input,
        w1_bias, w2_bias, expert_map, swiglu_limit,
    )


@fused_experts_op.register_fake
def _fused_experts_fake(hidden_states, *args):
    return torch.empty_like(hidden_states, memory_format=torch.contiguous_format)


def fused_experts_impl(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str,
    on_input: bool,
    w1_bias: torch.Tensor | None,
    w2_bias: torch.Tensor | None,
    expert_map: torch.Tensor | None,
    swiglu_limit: float | None,
    *,
    config: dict | None = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    out: torch.Tensor | None = None,
    warmup: bool = False,
    quant=None,
) -> torch.Tensor:
    """Launch the kernels on validated inputs (shapes as in :func:`fused_experts_triton`).

    ``config``: a kernel config (see :mod:`.triton_configs`), checked here (:func:`.config_keys.check_config`) unless
    ``quant`` is given (the quantised launcher checked its caller's config); None picks the tuned/heuristic one.
    ``warmup``: compile the kernels without launching them (the tuner precompiles candidates).
    ``quant``: quantised weights (a :class:`~moekit.ops.triton_experts_quant.QuantLaunch`: packed
    ``w1``/``w2``, their scales, the activation quantisation); None for weights in ``x``'s dtype.
    """
    t, h = x.shape
    e_local, _, inter = w2.shape
    inter *= quant.pack if quant is not None else 1
    k = topk_ids.shape[1]
    out = torch.empty_like(x) if out is None else out
    if t == 0:
        return out
    act = get_activation(activation)
    if config is None:
        config = get_config(x.device, t, e_local, h, inter, k, x.dtype, act.gated)
    elif quant is None:
        check_config(config)
    chunk = chunk_size(t, h, inter, k, e_local, x.element_size(), config, quant, workspace_bytes,
                       half=x.dtype == torch.float16, gated=act.gated)
    if chunk >= t:  # one chunk (every eager decode call): no slicing
        _run_chunk(x, w1, w2, topk_weights, topk_ids, out, act, on_input, w1_bias, w2_bias, expert_map,
                   swiglu_limit, config, warmup, quant)
        return out
    for start in range(0, t, chunk):
        stop = min(start + chunk, t)
        _run_chunk(
            x[start:stop], w1, w2, topk_weights[start:stop], topk_ids[start:stop], out[start:stop],
            act, on_input, w1_bias, w2_bias, expert_map, swiglu_limit, config, warmup, quant,
        )
        if warmup:
            break
    return out


def chunk_size(t: int, h: int, inter: int, k: int, e_local: int, elt: int, config: dict, quant=None,
               workspace_bytes: int = DEFAULT_WORKSPACE_BYTES, half: bool = False, gated: bool = True) -> int:
    """Tokens per chunk of a ``t``-token call whose scratch must stay under ``workspace_bytes``
    (:func:`~moekit.ops.experts.chunk_tokens`: the fewest equal chunks). ``elt``: the activations' element size;
    ``quant``: the :class:`~moekit.ops.triton_experts_quant.QuantLaunch` (its own buffers per token); ``half``:
    fp16 activations (the slot rows in float32); ``gated``: the activation's (``w13_split`` splits gated ones only)."""
    # scratch per token: inter rows + part rows (top-k > 1; float32 for fp16 activations) (+ ints); the padding rows
    # are a fixed extra
    rows = inter + (h if config.get("gather_pass") else 0)  # the inter row (+ the pre-gathered input row)
    part_elt = 4 if half and not (quant is not None and quant.fp8) else elt  # fp8: in bytes_per_token
    per_token = k * rows * elt + (k * h * part_elt if k > 1 else 0) + k * 12 + 64
    fixed = e_local * int(config["BLOCK_M"]) * rows * elt
    if quant is not None:
        per_token += quant.bytes_per_token(h, inter, k, bool(config.get("w13", {}).get("gluon_ws", 0)))
        fixed *= 2
    # config "w13_split": the fp32 gate | up rows [rows, 2I] before the epilogue pass (uncounted, they took up to 4x
    # the bound: 19.7 GB at K = 1, I = 8192, T = 300K)
    split = 8 * inter if config.get("w13_split") and gated else 0
    per_token += k * split
    fixed += e_local * int(config["BLOCK_M"]) * split
    return chunk_tokens(t, (workspace_bytes - fixed) // per_token)


def _run_chunk(x, w1, w2, tw, ids, out, act, on_input, b1, b2, emap, swiglu_limit, cfg, warmup=False, q=None):
    t, h = x.shape
    e_local, n1, inter = w1.shape[0], w1.shape[1], w2.shape[2]
    inter *= q.pack if q is not None else 1
    k = ids.shape[1]
    limit = effective_limit(act.name, swiglu_limit)
    p = launch_plan(
        t, h, inter, n1, e_local, emap.shape[0] if emap is not None else e_local, k, x.dtype, act.code,
        act.gated, bool(on_input), b1 is not None, b2 is not None, emap is not None, limit, _interpreting(),
        SMALL_SLOTS, INLINE_SLOTS, _freeze(cfg),
    )
    dev = x.device
    # two scratch allocations, split into views (int32 layout/semaphores; the dtype inter, part and gathered rows)
    counts, slot_loc, slot_rank, tok_live, row_start, sorted_slot, blk, sem = torch.empty(
        p.i32_total, dtype=torch.int32, device=dev
    ).split_with_sizes(p.i32_sizes)
    # the weighted slot rows before the top-k sum: float32 for fp8 experts (SPEC §8 sums the slots' fp32 outputs,
    # as the twin does) and for fp16 activations (round 50: two slots of +-7.1e4 that cancel gave inf in fp16; the
    # twins sum fp32 rows); bf16 rows keep bf16 (float32's range, the kernels' shipped bits)
    part_f32 = p.part_fp32 or (q is not None and q.fp8)
    if q is None:  # (a quantised format has its own inter buffers: fp8 values + scales)
        buf = torch.empty(p.buf_total, dtype=x.dtype, device=dev)
        inter_buf = buf.as_strided((p.rows, inter), (inter, 1))
    if q is None and not part_f32:
        part = buf.as_strided((p.part_rows, h), (h, 1), p.part_offset)
    else:  # the combine rows alone
        part = torch.empty(p.part_rows, h, dtype=torch.float32 if part_f32 else x.dtype, device=dev)
    if p.zero_counts:
        counts.zero_()
    emap_arg = emap if emap is not None else slot_loc  # never read without HAS_MAP

    def launch(kernel, grid, *args, **kw):
        if warmup:
            kernel.warmup(*args, grid=grid, **kw, **KERNEL_OPTIONS)
        else:
            kernel[grid](*args, **kw, **KERNEL_OPTIONS)

    if p.align != "inline":  # inline: the w13 launch zeroes the semaphores / dead rows itself
        args = (ids, tw, emap_arg, counts, slot_loc, slot_rank, tok_live, sem, out, row_start)
        sizes = (t, k, h, e_local, p.e_global, p.nbn, ids.stride(0), tw.stride(0), out.stride(0))
        if p.align == "small":
            launch(align.align_small_kernel, (1,), *args, sorted_slot, *sizes, **p.align_kw)
        else:
            launch(align.count_kernel, p.align_grid, *args, *sizes, **p.align_kw)
            launch(align.scatter_kernel, p.align_grid, slot_loc, slot_rank, row_start, sorted_slot, t, k,
                   **p.scatter_kw)

    a13, inter_w2, w13_kw, w2_kw = x, None, p.w13_kw, p.w2_kw
    tma_fmt = q is None or q.fp8  # packed 4-bit tiles are not TMA-shaped
    use_tma = p.want_tma and tma_fmt and _tma_ok(w1, w2, h, inter)
    gluon13 = gluon_experts.fp8_w13_ok(p, q, w1, use_tma, _interpreting())  # same bits, overlapped promotion
    # the warp-specialised fp8 w13 reads its rows by TMA: the input quantiser writes them in sorted order
    ws13 = gluon13 and gluon_experts.fp8_w13_ws_ok(p) and gluon_experts.fp8_w13_ws_rows_ok(h)
    # programmatic dependent launch (config "pdl": true; sm_90+, compiled kernels only): each GEMM
    # launch overlaps the tail of the kernel before it (H100, Qwen3-30B-A3B T=1: 39.9 -> 38.6 µs)
    pdl = p.want_pdl and _pdl_ok(dev)
    dec13 = gluon_experts.fp8_w13_dec_ok(p, q, w1, _interpreting())  # decode: same bits, loads in a producer warp
    if q is None:
        inter_w2 = inter_buf
    else:  # quantised: the fp8 input quantiser runs here; buffers and kernel arguments of the format
        a13, inter_buf, inter_w2, kw13, kw2 = q.setup(x, tw, p.rows, on_input, _interpreting(), launch,
                                                      (slot_loc, slot_rank, row_start) if ws13 else None,
                                                      follow=dec13 and pdl)
        # fp8: the input quantiser applied the routing weight already
        w13_kw = dict(p.w13_kw, ON_INPUT=on_input and not q.fp8, **kw13)
        w2_kw = dict(p.w2_kw, **kw2)
    w1_desc = w2_desc = inter_desc = None
    gather = {}  # config "gather_pass": the w13 input copied into the sorted layout, read by tensor descriptor
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        w1_desc = TensorDescriptor.from_tensor(w1.view(-1, h), [p.bn13, p.bk13])
        w2_desc = TensorDescriptor.from_tensor(w2.view(-1, inter), [p.bn2, p.bk2])
        inter_desc = TensorDescriptor.from_tensor(inter_w2, [p.bm, p.bk2])
        if p.gather and q is None:
            a13 = buf.as_strided((p.rows, h), (h, 1), p.xg_offset)  # (128-byte aligned: TMA needs 16)
            launch(rows_k.gather_rows_kernel, p.grid_gather, x, a13, slot_loc, slot_rank, row_start, t * k, k, h,
                   x.stride(0), a13.stride(0), **p.gather_kw)
            gather = dict(XG=True, x_desc=TensorDescriptor.from_tensor(a13, [p.bm, p.bk13]))
    flags = dict(USE_TMA=w1_desc is not None, PDL=pdl, **({"launch_pdl": True} if pdl else {}))
    w13_out = inter_buf
    if p.split:  # fp32 gate | up outputs, then the epilogue pass writes inter_buf (as the fused w13 would)
        w13_out = torch.empty(p.rows, 2 * inter, dtype=torch.float32, device=dev)
        epi = {n: w13_kw[n] for n in ("REQ", "is_ptr", "stride_isr", "qs_ptr", "UE8M0") if n in w13_kw}
        w13_kw = dict(w13_kw, REQ=0)
    blk_ready = False  # the persistent Gluon GEMMs' block -> expert table (blk) is written
    if dec13:
        gluon_experts.launch_fp8_w13_dec(launch, p, q, a13, w1, b1, w13_out, out, tw, ids, emap_arg, sem,
                                         (counts, row_start, sorted_slot), h, inter, k, t, w13_kw, pdl)
    elif gluon13:
        blk_ready = gluon_experts.launch_fp8_w13(launch, p, q, a13, w1, b1, w13_out, out, counts, row_start,
                                                 sorted_slot, blk, h, inter, k, w13_kw, ws13)
    elif gluon_w4.w4_ok(p, q, "w13", w1, x, _interpreting()):  # same bits, decoded into shared memory
        gluon_w4.launch_w4_w13(launch, p, q, a13, w1, b1, w13_out, counts, row_start, sorted_slot, h, inter, k)
    else:
        launch(
            grouped_gemm.w13_kernel, p.grid13, a13, w1, w1_desc, b1 if b1 is not None else w1, w13_out, tw, counts,
            sorted_slot, ids, emap_arg, sem, out,
            h, inter, n1, e_local, k, p.num_pid_m, p.limit_arg, t, p.e_global, p.nbn,
            a13.stride(0), w1.stride(0), w1.stride(1), b1.stride(0) if b1 is not None else 0, w13_out.stride(0),
            tw.stride(0), ids.stride(0), out.stride(0), **w13_kw, **flags, **gather,
        )
    if p.split:
        _epilogue_pass(w13_out, inter_buf, out, act, p, epi, launch)
    if q is not None:
        # fp8 per-row inputs of w2 (a row spans every w13 tile): over the live slots' rows after an align kernel
        by_slot = None if p.align == "inline" else (slot_loc[: t * k], slot_rank[: t * k], row_start)
        q.after_w13(inter_buf, _interpreting(), launch, by_slot, pdl=pdl)
    flags["USE_TMA"] = w2_desc is not None
    if w2_desc is not None and gluon_experts.fp8_w2_ok(p, q, w2, _interpreting()):  # same bits, overlapped promotion
        gluon_experts.launch_fp8_w2_sum(launch, p, q, inter_w2, w2_kw["as_ptr"], w2, b2, tw, counts, row_start,
                                        sorted_slot, blk, blk_ready, part, h, inter, k, bool(on_input))
    elif w2_desc is not None and gluon_experts.fp8_w2_dec_ok(p, q, w2, _interpreting()):  # decode: same bits
        gluon_experts.launch_fp8_w2_dec(launch, p, q, inter_w2, w2_kw["as_ptr"], w2, b2, out, tw, ids, emap_arg,
                                        part, sem, (counts, row_start, sorted_slot, tok_live), h, inter, k, t,
                                        bool(on_input), pdl)
    elif gluon_w4.w4_ok(p, q, "w2", w2, x, _interpreting()):  # (the plan asks only with the sum pass)
        gluon_w4.launch_w4_w2_sum(launch, p, q, inter_w2, w2, b2, tw, counts, row_start, sorted_slot, part, h,
                                       inter, k, bool(on_input))
    else:
        _launch_w2(launch, p, inter_w2, inter_desc, w2, w2_desc, b2, out, tw, ids, emap_arg, counts, sorted_slot,
                   part, sem, tok_live, h, inter, e_local, k, t, w2_kw, flags)
    if p.sum_pass:
        launch(combine_k.sum_slots_kernel, p.grid_sum, part, out, ids, tw, emap_arg, t, k, h, e_local, p.e_global,
               part.stride(0), out.stride(0), ids.stride(0), tw.stride(0), **p.sum_kw,
               **({"PDL": True, "launch_pdl": True} if pdl else {}))
    return out


def _launch_w2(launch, p, inter_w2, inter_desc, w2, w2_desc, b2, out, tw, ids, emap_arg, counts, sorted_slot, part,
               sem, tok_live, h, inter, e_local, k, t, w2_kw, flags) -> None:
    """The Triton w2 GEMM (weighting; the top-k sum in its tail unless the plan has the sum pass)."""
    launch(
        grouped_gemm.w2_kernel, p.grid2, inter_w2, inter_desc, w2, w2_desc,
        b2 if b2 is not None else w2, out, tw, ids, emap_arg, counts, sorted_slot,
        part, sem, tok_live,
        h, inter, e_local, p.e_global, k, p.num_pid_m, p.nbn, t * k,
        inter_w2.stride(0), w2.stride(0), w2.stride(1), b2.stride(0) if b2 is not None else 0, out.stride(0),
        tw.stride(0), ids.stride(0), part.stride(0), **w2_kw, **flags,
    )


def _epilogue_pass(hbuf, inter_buf, out, act, p, epi: dict, launch) -> None:
    """After a split w13: act(gate, up) of ``hbuf [rows, 2I]`` fp32 into ``inter_buf`` (rounded, or
    quantised for w2 as ``epi`` says: REQ 1 one program per group of BN = bk columns)."""
    req = int(epi.get("REQ", 0))
    n = inter_buf.shape[1]
    block = p.bn13 if req == 1 else min(1024, triton.next_power_of_2(n))
    launch(epilogue.act_pass_kernel, (p.rows, triton.cdiv(n, block)), hbuf, inter_buf, epi.get("is_ptr"),
           epi.get("qs_ptr"), out, n, p.limit_arg, hbuf.stride(0), inter_buf.stride(0), int(epi.get("stride_isr", 0)),
           ACT=act.code, HAS_LIMIT=p.w13_kw["HAS_LIMIT"], REQ=req,
           UE8M0=bool(epi.get("UE8M0", False)), BLOCK=block, INTERP=_interpreting(), num_warps=4)


def _tma_ok(w1: torch.Tensor, w2: torch.Tensor, h: int, inter: int) -> bool:
    """Tensor descriptors need sm_90+, contiguous weights, 16-byte aligned bases and row strides."""
    if w1.device.type == "cuda" and _major(w1.device) < 9:
        return False  # TMA is a Hopper (sm_90+) engine
    elt = w1.element_size()
    return (
        w1.is_contiguous() and w2.is_contiguous() and (h * elt) % 16 == 0 and (inter * elt) % 16 == 0
        and w1.data_ptr() % 16 == 0 and w2.data_ptr() % 16 == 0
    )
