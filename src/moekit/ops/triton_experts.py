"""Triton routed experts: the Triton kernel table's ``experts`` (math in :mod:`.experts`).

    fused_experts_triton -> torch.ops.moekit.fused_experts (custom op, registered here)
                         -> fused_experts_impl (launcher) -> align / grouped_gemm kernels

Pipeline per chunk of tokens (no host synchronisation anywhere: CUDA-graph capturable)::

    align    (1 launch for T·K <= SMALL_SLOTS, else memset + count + scatter)
             -> counts [E_local], sorted_slot [rows] (per-expert blocks of BLOCK_M rows, padded)
    w13 GEMM -> inter [rows, I] = act(x[tok] · w13[e]ᵀ + b13[e])   (input dtype)
    w2 GEMM  -> out [T, H]: weighted, top-k summed in slot order inside the GEMM (deterministic)

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

from ._triton import align, grouped_gemm
from .activation import effective_limit, get_activation
from .triton_configs import get_config

#: upper bound on the scratch of one chunk (inter + combine buffers), bytes
DEFAULT_WORKSPACE_BYTES = 4 * 1024**3
#: at most this many slots (T·K) per chunk use the single-launch align kernel
SMALL_SLOTS = 8192
#: at most this many slots skip the align kernel: the GEMMs derive the layout in registers (decode).
#: Measured on H100: a win at T·K <= 16 (Qwen3 T=1: 42.4 -> 40.6 µs), a loss at 64 (DeepSeek T=8:
#: 1552 -> 1682 µs: every GEMM program redoes an [S, S] rank computation)
INLINE_SLOTS = 16


def fused_experts_triton(
    x, w1, w2, topk_weights, topk_ids, *, activation="silu", apply_router_weight_on_input=False,
    w1_bias=None, w2_bias=None, expert_map=None, swiglu_limit=None,
) -> torch.Tensor:
    """Routed experts on the Triton kernels, through the ``moekit::fused_experts`` custom op.

    x: [T, H] fp32/bf16/fp16; w1: [E_local, 2I | I, H]; w2: [E_local, H, I]; topk_weights: [T, K] float;
    topk_ids: [T, K] int32/int64; w1_bias: [E_local, 2I | I]; w2_bias: [E_local, H];
    expert_map: [E] int32 (-1: not on this rank). returns: [T, H] dtype of x.
    """
    # the kernels assume unit last-dim strides: make any view contiguous (free when it already is)
    b1, b2, emap = (None if t is None else t.contiguous() for t in (w1_bias, w2_bias, expert_map))
    return fused_experts_op(
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
    return fused_experts_impl(
        hidden_states, w1, w2, topk_weights, topk_ids, activation, apply_router_weight_on_input,
        w1_bias, w2_bias, expert_map, swiglu_limit,
    )


@fused_experts_op.register_fake
def _fused_experts_fake(hidden_states, *args):
    return torch.empty_like(hidden_states)


def _launch_config(cfg: dict, name: str) -> dict:
    c = cfg[name]
    return dict(num_warps=int(c["num_warps"]), num_stages=int(c["num_stages"]))


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

    ``config``: a kernel config (see :mod:`.triton_configs`); None picks the tuned/heuristic one.
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
    bm = int(config["BLOCK_M"])
    combine = k > 1
    # scratch per token: inter rows + part rows (+ ints); the padding rows are a fixed extra
    per_token = k * (inter + (h if combine else 0)) * x.element_size() + k * 12 + 64
    fixed = e_local * bm * inter * x.element_size()
    if quant is not None:
        per_token += quant.bytes_per_token(h, inter, k)
        fixed *= 2
    chunk = max(1, min(t, (workspace_bytes - fixed) // per_token))
    for start in range(0, t, chunk):
        stop = min(start + chunk, t)
        _run_chunk(
            x[start:stop], w1, w2, topk_weights[start:stop], topk_ids[start:stop], out[start:stop],
            act, on_input, w1_bias, w2_bias, expert_map, swiglu_limit, config, warmup, quant,
        )
        if warmup:
            break
    return out


def _run_chunk(x, w1, w2, tw, ids, out, act, on_input, b1, b2, emap, swiglu_limit, cfg, warmup=False, q=None):
    def launch(kernel, grid, *args, **kw):
        if warmup:
            kernel.warmup(*args, grid=grid, **kw)
        else:
            kernel[grid](*args, **kw)

    t, h = x.shape
    e_local, _, inter = w2.shape
    inter *= q.pack if q is not None else 1
    k = ids.shape[1]
    e_global = emap.shape[0] if emap is not None else e_local
    dev = x.device
    bm = int(cfg["BLOCK_M"])
    c13, c2 = cfg["w13"], cfg["w2"]
    combine = k > 1
    slots = t * k
    nbn = triton.cdiv(h, int(c2["BN"]))
    num_pid_m = triton.cdiv(slots + min(slots, e_local) * (bm - 1), bm)
    rows = num_pid_m * bm
    block_e = triton.next_power_of_2(e_local + 1)
    i32 = torch.int32
    counts = torch.zeros(e_local + 1, dtype=i32, device=dev) if slots > SMALL_SLOTS else torch.empty(
        e_local + 1, dtype=i32, device=dev
    )
    slot_loc = torch.empty(slots, dtype=i32, device=dev)
    slot_rank = torch.empty(slots, dtype=i32, device=dev)
    tok_live = torch.empty(t, dtype=i32, device=dev)
    row_start = torch.empty(e_local, dtype=i32, device=dev)
    sorted_slot = torch.empty(rows, dtype=i32, device=dev)
    part = torch.empty(slots if combine else 1, h, dtype=x.dtype, device=dev)
    sem = torch.empty(t * nbn if combine else 1, dtype=i32, device=dev)
    emap_arg = emap if emap is not None else slot_loc  # never read without HAS_MAP
    kp = triton.next_power_of_2(k)
    bt = max(1, 1024 // kp)
    skip_zero = not on_input
    common = dict(BM=bm, BLOCK_E=block_e, BT=bt, KP=kp, ZB=1024, BH=64, HAS_MAP=emap is not None,
                  SKIP_ZERO=skip_zero, COMBINE=combine)
    args = (ids, tw, emap_arg, counts, slot_loc, slot_rank, tok_live, sem, out, row_start)
    sizes = (t, k, h, e_local, e_global, nbn, ids.stride(0), tw.stride(0), out.stride(0))
    inline = slots <= INLINE_SLOTS
    sp, tp = max(16, triton.next_power_of_2(slots)), max(16, triton.next_power_of_2(t))
    if inline:
        pass  # the w13 launch zeroes the semaphores / dead rows; each GEMM program builds its layout
    elif slots <= SMALL_SLOTS:
        launch(align.align_small_kernel, (1,), *args, sorted_slot, *sizes, **common, num_warps=4)
    else:
        grid = (triton.cdiv(t, bt),)
        launch(align.count_kernel, grid, *args, *sizes, **common, num_warps=4)
        launch(align.scatter_kernel, grid, slot_loc, slot_rank, row_start, sorted_slot, t, k, BT=bt, KP=kp, num_warps=4)

    dot_prec = "ieee" if x.dtype == torch.float32 else "tf32"
    upcast = _interpreting()
    limit = effective_limit(act.name, swiglu_limit)
    bn13, bk13 = int(c13["BN"]), int(c13["BK"])
    bn2, bk2 = int(c2["BN"]), int(c2["BK"])
    a13, on13, kw13, kw2 = x, on_input, {}, {}
    if q is None:
        inter_buf = inter_w2 = torch.empty(rows, inter, dtype=x.dtype, device=dev)
    else:  # quantised: the fp8 input quantiser runs here; buffers and kernel arguments of the format
        a13, inter_buf, inter_w2, kw13, kw2 = q.setup(x, tw, rows, on_input, upcast, launch)
        on13 = on_input and not q.fp8  # fp8: the input quantiser applied the routing weight
    w1_desc = w2_desc = inter_desc = None
    tma_fmt = q is None or q.fp8  # packed 4-bit tiles are not TMA-shaped
    if cfg.get("tma") and tma_fmt and _tma_ok(w1, w2, h, inter) and x.dtype != torch.float32:
        from triton.tools.tensor_descriptor import TensorDescriptor

        w1_desc = TensorDescriptor.from_tensor(w1.view(-1, h), [bn13, bk13])
        w2_desc = TensorDescriptor.from_tensor(w2.view(-1, inter), [bn2, bk2])
        inter_desc = TensorDescriptor.from_tensor(inter_w2, [bm, bk2])
    # programmatic dependent launch (config "pdl": true; sm_90+, compiled kernels only): each GEMM
    # launch overlaps the tail of the kernel before it (H100, Qwen3-30B-A3B T=1: 39.9 -> 38.6 µs)
    pdl = bool(cfg.get("pdl")) and _pdl_ok(x)
    pdl_kw = dict(launch_pdl=True) if pdl else {}
    grid13 = (num_pid_m * triton.cdiv(inter, bn13),)
    launch(
        grouped_gemm.w13_kernel, grid13, a13, w1, w1_desc, b1 if b1 is not None else w1, inter_buf, tw, counts,
        sorted_slot, ids, emap_arg, sem, out,
        h, inter, w1.shape[1], e_local, k, num_pid_m, 0.0 if limit is None else limit, t, e_global, nbn,
        a13.stride(0), w1.stride(0), w1.stride(1), b1.stride(0) if b1 is not None else 0, inter_buf.stride(0),
        tw.stride(0), ids.stride(0), out.stride(0),
        BM=bm, BN=bn13, BK=bk13, GROUP_M=int(c13["GROUP_M"]), BLOCK_E=block_e, ACT=act.code, GATED=act.gated,
        HAS_BIAS=b1 is not None, HAS_LIMIT=limit is not None, ON_INPUT=on13, EVEN_K=h % bk13 == 0,
        DOT_PREC=dot_prec, UPCAST=upcast, USE_TMA=w1_desc is not None, INLINE=inline, SP=sp, TP=tp,
        HAS_MAP=emap is not None, SKIP_ZERO=skip_zero, COMBINE=combine, PDL=pdl, **_launch_config(cfg, "w13"),
        **pdl_kw, **kw13,
    )
    if q is not None:
        q.after_w13(inter_buf, upcast, launch)  # fp8 per-row inputs of w2: a row spans every w13 tile
    launch(
        grouped_gemm.w2_kernel, (num_pid_m * nbn,), inter_w2, inter_desc, w2, w2_desc,
        b2 if b2 is not None else w2, out, tw, ids, emap_arg, counts, sorted_slot,
        part, sem, tok_live,
        h, inter, e_local, e_global, k, num_pid_m, nbn, slots,
        inter_w2.stride(0), w2.stride(0), w2.stride(1), b2.stride(0) if b2 is not None else 0, out.stride(0),
        tw.stride(0), ids.stride(0), part.stride(0),
        BM=bm, BN=bn2, BK=bk2, GROUP_M=int(c2["GROUP_M"]), BLOCK_E=block_e, HAS_BIAS=b2 is not None,
        ON_INPUT=on_input, HAS_MAP=emap is not None, SKIP_ZERO=skip_zero, COMBINE=combine,
        EVEN_K=inter % bk2 == 0, DOT_PREC=dot_prec, UPCAST=upcast, USE_TMA=w2_desc is not None,
        INLINE=inline, SP=sp, PDL=pdl, **_launch_config(cfg, "w2"), **pdl_kw, **kw2,
    )
    return out


def _tma_ok(w1: torch.Tensor, w2: torch.Tensor, h: int, inter: int) -> bool:
    """Tensor descriptors need sm_90+, contiguous weights, 16-byte aligned bases and row strides."""
    if w1.device.type == "cuda" and torch.cuda.get_device_capability(w1.device)[0] < 9:
        return False  # TMA is a Hopper (sm_90+) engine
    elt = w1.element_size()
    return (
        w1.is_contiguous() and w2.is_contiguous() and (h * elt) % 16 == 0 and (inter * elt) % 16 == 0
        and w1.data_ptr() % 16 == 0 and w2.data_ptr() % 16 == 0
    )


def _pdl_ok(x: torch.Tensor) -> bool:
    """Programmatic dependent launch: Hopper (sm_90) or newer, never under the interpreter."""
    return x.device.type == "cuda" and not _interpreting() and torch.cuda.get_device_capability(x.device)[0] >= 9


def _interpreting() -> bool:
    from triton import knobs

    return bool(knobs.runtime.interpret)
