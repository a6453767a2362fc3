"""Quantised routed experts on the Triton kernels (SPEC §8); the math is
:func:`.experts_quant.fused_experts_quant_torch`'s (a format as the kernels see it, and the tiles it requires:
:mod:`.quant_spec`).

    fused_experts_quant_triton -> torch.ops.moekit.fused_experts_quant (custom op, registered here)
        -> triton_experts.fused_experts_impl(quant=QuantLaunch) -> align, [x quantiser], w13, [inter quantiser], w2

What runs where (kernels in :mod:`._triton.quant` and :mod:`._triton.grouped_gemm`):

- **fp8 block** ``(bn, bk)``: a small kernel quantises ``x`` per (token, group of bk): ``x_q [T, H]`` e4m3,
  ``x_s [T, ⌈H/bk⌉]``. w13 (BK = bk) runs fp8 dots, ``acc += (x_q · Wq) · x_s[t, k/bk] · S[e, n/bn, k/bk]``
  per K step, then bias, clamp, activation (fp32), rounding to the params dtype and the fp8 quantisation
  of w2's input (``inter_q``, ``inter_s [rows, ⌈I/bk⌉]``): fused into the epilogue when w13's BN = bk (one
  group per tile), else a separate pass over the rounded rows (narrow w13 tiles: more programs at decode;
  the same rounding and group amax, so the same bits). w2 runs the same fp8 loop over I, then bias,
  routing weight and the deterministic slot-order combine of the unquantised path.
- **fp8 channel / tensor**: ``x`` quantised per token (one group = the row) or with the static scale
  (the largest ``w13_input_scale``); ``acc = Σ_k-steps x_q · Wq`` then ``acc · s_x[t] · S[e, n]`` after the
  loop (per tensor: ``S[e, shard]``). A per-token scale of w2's input spans all of I, so w13 stores
  ``inter`` in the params dtype and the same small kernel quantises its rows; static: fused into w13.
- **mxfp4 / int4 groups** (weight-only): activations stay in the params dtype; weight tiles are
  unpacked and dequantised in registers (no dequantised weights in memory), then the unquantised dot.

Batch invariance (SPEC §9): the K step is fixed per shape and format (fp8 block: bk; fp8 row: 128;
4-bit: 128, 64 for fp32 activations), whatever the token count, and so is the fp8 instruction
(``fp8_acc``: wgmma with ``BLOCK_M`` >= 64 in every bucket); no split-K; the combine is the unquantised
path's. Tile constraints: fp8 block needs ``bk`` a power of two >= 16 and 32 <= w13's BN <= bk.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
import triton

from ._device import interpreting as _interpreting, major as _major
from ._eager import direct_call_ok, unit_rows
from ._triton import quant as qk
from .activation import get_activation
from .config_keys import check_config
from .formats import WeightFormat
from .quant_config import parse_quant_config
from .quantize import check_quant_weights
from .quant_spec import _CODES, QUANT_FORMATS, QuantSpec
from .triton_configs import get_config
from .triton_experts import fused_experts_impl
from .w4_layout import relaid_ok

__all__ = ["fused_experts_quant_triton", "launch_quant_experts", "QuantSpec", "QuantLaunch", "QUANT_FORMATS"]

_FP8 = torch.float8_e4m3fn
_FAR = 1 << 30  # "scale row = n // _FAR" = 0: one scale for every column (per tensor)


def _ws_args(scale: torch.Tensor, shard: int, qbn: int) -> dict:
    """Scale of column n: ``scale[e, (n // qbn)(+ shard)]`` (+ the k index of the scale)."""
    return dict(ws_ptr=scale, stride_wse=scale.stride(0), stride_wsn=scale.stride(1) if scale.dim() > 1 else 0,
                ws_qbn=qbn, **({"ws_shard": shard} if shard is not None else {}))


#: the activation quantiser's programs (mode 0): up to 4096 values each, fewer values while that would leave under
#: this many programs (~16 per SM of a 132-SM H200; round 18: 4 per SM took Mixtral T = 8 from 7.3 to 10.5 µs)
_QUANT_PROGRAMS = 2112


class QuantLaunch:
    """One call's quantised operands for :func:`~.triton_experts.fused_experts_impl`: the format, the
    weight scales (fp32, or uint8 e8m0 / the int4 scale dtype), static input scales ``[1]`` (device)."""

    def __init__(self, spec: QuantSpec, w13_scale, w2_scale, s13, s2, inter: int, fp8_acc: int = 0, bn13: int = 0,
                 w_align: tuple[int, int] = (1, 1), ptx: bool = False):
        self.spec, self.fp8, self.pack, self._inter = spec, spec.fp8, spec.pack, inter
        self.w_align = w_align  # packed weights: elements per aligned 16-byte vector of w13 / w2 rows (or 1)
        # fp8 block: w13 quantises w2's input in its epilogue when one tile is one group (BN == bk)
        self.fused_req = spec.static or (spec.code == 1 and bn13 == spec.block_k)
        self.s13_static, self.s2_static = s13, s2
        if spec.fp8:
            w13_scale, w2_scale = w13_scale.float().contiguous(), w2_scale.float().contiguous()
        else:
            w13_scale, w2_scale = w13_scale.contiguous(), w2_scale.contiguous()
        if spec.code == 1:
            nb = -(-inter // spec.block_n)
            self.ws13, self.ws2 = _ws_args(w13_scale, nb, spec.block_n), _ws_args(w2_scale, None, spec.block_n)
        elif spec.code == 2 and spec.per_tensor:
            self.ws13, self.ws2 = _ws_args(w13_scale, 1, _FAR), _ws_args(w2_scale.view(-1), None, _FAR)
            self.ws2["stride_wse"] = 1
        else:  # one scale row per weight row
            self.ws13, self.ws2 = _ws_args(w13_scale, inter, 1), _ws_args(w2_scale, None, 1)
        self.common = dict(QUANT=spec.code, PACK=spec.pack, QG=spec.block_k if not spec.fp8 else 1,
                           FP8_ACC=fp8_acc if spec.fp8 else 0, PTX=ptx and not spec.fp8,
                           **({"RELAID": True} if spec.relaid else {}))
        self._post = None

    def bytes_per_token(self, h: int, inter: int, k: int, sorted_rows: bool = False) -> int:
        """Scratch per token besides the unquantised path's: x_q, inter_q and their scales, fp32 combine rows;
        ``sorted_rows``: x_q and its scales once per slot (:meth:`_quantise_sorted`)."""
        if not self.fp8:
            return 0
        xq = (k if sorted_rows else 1) * (h + 8 * h // max(self.spec.block_k, 1))
        return xq + k * inter * 2 + 16 * k + 2 * k * h

    def _quantise(self, src, launch, interp, *, static=None, on_input=False, tw=None, out=None, slots=None,
                  pdl=False, follow=False):
        """The activation quantiser over the rows of ``src`` -> (x_q e4m3, scales, row stride of scales);
        ``out``: preallocated ``(x_q, scales)``; ``slots``: the align kernel's ``(loc, rank, row_start)``: only the
        sorted rows of live slots (``src`` in the sorted layout; the kernel's rows are then the slots); ``pdl``: a
        programmatic dependent launch (``act_quant_kernel``'s ``PDL``: the launch after it may begin at once, then it
        waits); ``follow``: a programmatic dependent launch that waits first, then lets the launch after it begin
        (``WAIT_FIRST``)."""
        t, n = src.shape
        sp = self.spec
        mode = 2 if static is not None else (0 if sp.code == 1 else 1)  # per group of bk / per row / static
        g = sp.block_k if mode == 0 else 1
        if out is not None:
            xq, xs = out
        else:
            xq = torch.empty(t, n, dtype=_FP8, device=src.device)
            xs = static if mode == 2 else torch.empty(t, triton.cdiv(n, g) if mode == 0 else 1,
                                                      dtype=torch.float32, device=src.device)
        rows = t if slots is None else slots[0].shape[0]
        pairs = rows * triton.cdiv(n, g)  # mode 0: (row, group) pairs, GP per program
        gp = max(1, min(4096 // g, triton.next_power_of_2(triton.cdiv(pairs, _QUANT_PROGRAMS)))) if mode == 0 else 1
        grid = (triton.cdiv(pairs, gp),) if mode == 0 else (rows,)
        by_slot = {} if slots is None else dict(SLOTS=True, loc_ptr=slots[0], rank_ptr=slots[1],
                                                row_start_ptr=slots[2])
        if rows:
            launch(qk.act_quant_kernel, grid, src, xq, xs, tw if tw is not None else src, static, n, rows,
                   src.stride(0), xq.stride(0), xs.stride(0) if mode < 2 else 0, tw.stride(0) if tw is not None else 0,
                   G=g, GP=gp, BLOCK=min(1024, triton.next_power_of_2(n)), MODE=mode, UE8M0=sp.ue8m0,
                   ON_INPUT=on_input, INTERP=interp, num_warps=4, **by_slot,
                   **({"PDL": True, "launch_pdl": True} if pdl else
                      {"PDL": True, "WAIT_FIRST": True, "launch_pdl": True} if follow else {}))
        return xq, xs, (xs.stride(0) if mode < 2 else 0)

    def _quantise_sorted(self, x, tw, rows: int, layout: tuple, on_input: bool, interp: bool, launch):
        """fp8 block: the input quantiser writing each token's row at the sorted rows of its live slots
        (:func:`._triton.quant.act_quant_sorted_kernel`; ``layout`` = the align kernel's (loc, rank, row_start))
        -> (x_q [rows, H] e4m3, scales [⌈H/bk⌉, rows] fp32, the scales' group stride)."""
        t, n = x.shape
        g = self.spec.block_k
        ng = triton.cdiv(n, g)
        xq = torch.empty(rows, n, dtype=_FP8, device=x.device)
        xs = torch.empty(ng, rows, dtype=torch.float32, device=x.device)
        gp = min(triton.next_power_of_2(ng), max(1, 2048 // g))
        if t:
            loc, rank, row_start = layout
            launch(qk.act_quant_sorted_kernel, (t, triton.cdiv(ng, gp)), x, xq, xs, tw, loc, rank, row_start, n,
                   tw.shape[1], x.stride(0), xq.stride(0), xs.stride(0), tw.stride(0), G=g, GP=gp,
                   UE8M0=self.spec.ue8m0, ON_INPUT=on_input, INTERP=interp, num_warps=4)
        return xq, xs, xs.stride(0)

    def setup(self, x, tw, rows: int, on_input: bool, interp: bool, launch, sorted_layout: tuple | None = None,
              follow: bool = False):
        """Per chunk: (w13's A operand, w13's output, w2's A operand, w13 kwargs, w2 kwargs). ``sorted_layout``
        (fp8 block, for the warp-specialised Gluon w13): the align kernel's (loc, rank, row_start); w13's A
        operand is then quantised into the sorted rows (:meth:`_quantise_sorted`). ``follow`` (the plan's ``"pdl"``
        before the Gluon decode w13): the input quantiser is a programmatic dependent of the launch before it (the
        routing kernel lets it start at once), waits for it, then lets the w13 after it begin (``act_quant_kernel``'s
        ``WAIT_FIRST``). Before the Triton w13 it stays a plain launch: Mixtral's T = 1 layer measured 99.2-99.5 µs so,
        99.8-100.3 with it a waiting dependent (H200, round 34, ``benchmarks/route_pdl_probe.py``)."""
        n_inter = self._inter
        dev, sp = x.device, self.spec
        kw13 = dict(self.common, **self.ws13, W_ALIGN=self.w_align[0])
        kw2 = dict(self.common, **self.ws2, W_ALIGN=self.w_align[1])
        if not self.fp8:
            buf = torch.empty(rows, n_inter, dtype=x.dtype, device=dev)
            return x, buf, buf, kw13, kw2
        if sorted_layout is not None:
            xq, xs, sxs = self._quantise_sorted(x, tw, rows, sorted_layout, on_input, interp, launch)
        else:
            xq, xs, sxs = self._quantise(x, launch, interp, static=self.s13_static, on_input=on_input, tw=tw,
                                         follow=follow)
        kw13.update(xs_ptr=xs, stride_xst=sxs, UE8M0=sp.ue8m0)
        self._post = None
        if self.fused_req:  # w2's input quantised in the w13 epilogue
            inter_q = torch.empty(rows, n_inter, dtype=_FP8, device=dev)
            if sp.code == 1:
                inter_s = torch.empty(rows, triton.cdiv(n_inter, sp.block_k), dtype=torch.float32, device=dev)
                kw13.update(REQ=1, is_ptr=inter_s, stride_isr=inter_s.stride(0))
                kw2.update(as_ptr=inter_s, stride_asr=inter_s.stride(0))
            else:
                kw13.update(REQ=2, qs_ptr=self.s2_static)
                kw2.update(as_ptr=self.s2_static, stride_asr=0)
            return xq, inter_q, inter_q, kw13, kw2
        # w13 writes the params dtype, then a pass quantises each row (per token, or per group of bk: the
        # same rounding and group amax as the fused epilogue, so the same bits)
        buf = torch.empty(rows, n_inter, dtype=x.dtype, device=dev)
        inter_q = torch.empty(rows, n_inter, dtype=_FP8, device=dev)
        ng = triton.cdiv(n_inter, sp.block_k) if sp.code == 1 else 1
        inter_s = torch.empty(rows, ng, dtype=torch.float32, device=dev)
        self._post = (buf, inter_q, inter_s)
        kw2.update(as_ptr=inter_s, stride_asr=inter_s.stride(0))
        return xq, buf, inter_q, kw13, kw2

    def after_w13(self, inter_buf, interp: bool, launch, slots: tuple | None = None, pdl: bool = False) -> None:
        """The separate quantisation of w2's input (when w13 did not fuse it): the dynamic quantiser, over the live
        slots' rows when ``slots`` (the align kernel's ``(loc, rank, row_start)``) is given, else over every row
        (the inline layout at decode: a few rows); ``pdl``: launched as a programmatic dependent of w13 (the
        plan's ``"pdl"``), so that the w2 after it may start its weight loads early."""
        if self._post is None:
            return
        buf, inter_q, inter_s = self._post
        self._quantise(buf, launch, interp, out=(inter_q, inter_s), slots=slots, pdl=pdl)
        self._post = None


def fused_experts_quant_triton(
    hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
    topk_ids: torch.Tensor, *, fmt, w13_scale: torch.Tensor, w2_scale: torch.Tensor,
    w13_input_scale: torch.Tensor | None = None, w2_input_scale: torch.Tensor | None = None,
    activation: str = "silu", apply_router_weight_on_input: bool = False, w1_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None, expert_map: torch.Tensor | None = None, swiglu_limit: float | None = None,
    global_num_experts: int = -1,
) -> torch.Tensor:
    """Quantised routed experts on the Triton kernels (module docstring), through the
    ``moekit::fused_experts_quant`` custom op. Arguments as :func:`.experts_quant.fused_experts_quant_torch`
    (``global_num_experts`` is implied by ``expert_map``). The format and the weight / scale shapes are
    checked here (no value checks: ids outside ``[0, E)`` are dead slots, as on the unquantised path).

    returns: [T, H] dtype of hidden_states.
    """
    fmt = parse_quant_config(fmt)
    if not isinstance(fmt, WeightFormat):
        raise ValueError("fmt must name a quantised format (an HF quant dict or a format object), got None")
    check_quant_weights(fmt, w13, w2, w13_scale, w2_scale, w13_input_scale=w13_input_scale,
                        w2_input_scale=w2_input_scale)
    return launch_quant_experts(
        hidden_states, w13, w2, topk_weights, topk_ids, fmt=fmt, w13_scale=w13_scale, w2_scale=w2_scale,
        w13_input_scale=w13_input_scale, w2_input_scale=w2_input_scale, activation=activation,
        apply_router_weight_on_input=apply_router_weight_on_input, w1_bias=w1_bias, w2_bias=w2_bias,
        expert_map=expert_map, swiglu_limit=swiglu_limit,
    )


def launch_quant_experts(
    hidden_states, w13, w2, topk_weights, topk_ids, *, fmt: WeightFormat, w13_scale, w2_scale,
    w13_input_scale=None, w2_input_scale=None, activation="silu", apply_router_weight_on_input=False,
    w1_bias=None, w2_bias=None, expert_map=None, swiglu_limit=None, global_num_experts=-1, packed_layout="spec",
) -> torch.Tensor:
    """:func:`fused_experts_quant_triton` on inputs already checked (the kernel table's entry: a layer
    checked its weights when they were loaded). ``fmt``: a format object; ``packed_layout``: ``"spec"`` (SPEC §8's
    packing) or ``"rega"`` (mxfp4 / int4 words re-laid by :func:`.w4_layout.relay_rega`, as a layer on this backend
    stores them where :func:`.w4_layout.rega_layout_ok` holds). Eagerly the launcher is called directly (see
    :mod:`._eager`); torch.compile, fake tensors and dispatch modes go through the op."""
    if packed_layout not in ("spec", "rega"):
        raise ValueError(f"packed_layout must be 'spec' or 'rega', got {packed_layout!r}")
    spec = QuantSpec.of(fmt, relaid=packed_layout == "rega")
    c = lambda v: None if v is None else v.contiguous()  # noqa: E731 - the kernels assume unit last-dim strides
    act, on_input = get_activation(activation).name, bool(apply_router_weight_on_input)
    limit = None if swiglu_limit is None else float(swiglu_limit)
    x, ids, tw = hidden_states.contiguous(), topk_ids.contiguous(), topk_weights.contiguous()
    if direct_call_ok(hidden_states):
        spec = replace(spec, static=w13_input_scale is not None)
        return fused_experts_quant_impl(x, w13.contiguous(), w2.contiguous(), tw, ids, spec, w13_scale, w2_scale,
                                        w13_input_scale, w2_input_scale, act, on_input, c(w1_bias), c(w2_bias),
                                        c(expert_map), limit)
    if spec.fp8:  # fp8 weights cross the op boundary as bytes (torch has few fp8 ops: opcheck's schema check)
        w13, w2 = w13.view(torch.uint8), w2.view(torch.uint8)
    return fused_experts_quant_op(
        x, w13.contiguous(), w2.contiguous(), tw, ids, w13_scale, w2_scale, w13_input_scale, w2_input_scale,
        fmt.name, spec.block_n, spec.block_k, spec.ue8m0, spec.per_tensor, act, on_input, c(w1_bias), c(w2_bias),
        c(expert_map), limit, spec.relaid,
    )


@torch.library.custom_op("moekit::fused_experts_quant", mutates_args=())
def fused_experts_quant_op(
    hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
    topk_ids: torch.Tensor, w13_scale: torch.Tensor, w2_scale: torch.Tensor,
    w13_input_scale: Optional[torch.Tensor], w2_input_scale: Optional[torch.Tensor],
    fmt_name: str, block_n: int, block_k: int, ue8m0: bool, per_tensor: bool,
    activation: str, apply_router_weight_on_input: bool, w1_bias: Optional[torch.Tensor],
    w2_bias: Optional[torch.Tensor], expert_map: Optional[torch.Tensor], swiglu_limit: Optional[float],
    relaid: bool = False,
) -> torch.Tensor:
    """``torch.library`` op around :func:`fused_experts_quant_impl` (torch.compile(fullgraph=True) traces
    through it, CUDA graphs capture it). fp8 weights travel as uint8 views of their bytes (torch has
    few fp8 ops, and opcheck's schema check multiplies inputs). The format travels as ``fmt_name`` + ``block_n`` /
    ``block_k`` (fp8 block; int4: ``block_k`` = group size), ``ue8m0``, ``per_tensor``, ``relaid`` (4-bit words in
    the register-operand layout); static fp8 inputs are implied by the input scales."""
    (hidden_states, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, w1_bias, w2_bias, expert_map) = unit_rows(
        hidden_states, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, w1_bias, w2_bias, expert_map)
    static = w13_input_scale is not None
    code = _CODES[fmt_name]
    if code <= 2:  # fp8 weights arrive as their bytes (uint8 views)
        w13, w2 = w13.view(_FP8), w2.view(_FP8)
    spec = QuantSpec(code, block_n, block_k, ue8m0=ue8m0, per_tensor=per_tensor, static=static,
                     pack={3: 2, 4: 8}.get(code, 1), relaid=relaid)
    return fused_experts_quant_impl(
        hidden_states, w13, w2, topk_weights, topk_ids, spec, w13_scale, w2_scale, w13_input_scale, w2_input_scale,
        activation, apply_router_weight_on_input, w1_bias, w2_bias, expert_map, swiglu_limit,
    )


@fused_experts_quant_op.register_fake
def _fused_experts_quant_fake(hidden_states, *args):
    return torch.empty_like(hidden_states, memory_format=torch.contiguous_format)


def fused_experts_quant_impl(x, w13, w2, topk_weights, topk_ids, spec: QuantSpec, w13_scale, w2_scale,
                             w13_input_scale, w2_input_scale, activation: str, on_input: bool, w1_bias, w2_bias,
                             expert_map, swiglu_limit, *, config: dict | None = None, warmup: bool = False):
    """Config (tuned or heuristic, keyed by the format; then :meth:`QuantSpec.fix_config`) and launch."""
    t, h = x.shape
    e_local, _, inter_packed = w2.shape
    inter = inter_packed * spec.pack
    if spec.relaid and not (relaid_ok(h) and relaid_ok(inter)):
        raise ValueError(f"re-laid 4-bit weights (the register-operand layout) need H and I in whole 128-value chunks, "
                         f"the last may be half (multiples of 64), got H = {h}, I = {inter}")
    act = get_activation(activation)
    if config is None:
        config = get_config(x.device, t, e_local, h, inter, topk_ids.shape[1], x.dtype, act.gated, quant=spec.key)
    else:
        check_config(config)
    config = spec.fix_config(config, x.dtype)
    s13 = s2 = None
    if w13_input_scale is not None:  # static fp8 inputs: the largest scale over experts (SPEC §8), on device
        s13 = w13_input_scale.max().float().reshape(1)
        s2 = w2_input_scale.max().float().reshape(1)
    align = (1, 1) if spec.fp8 else (_vector_align(w13), _vector_align(w2))
    q = QuantLaunch(spec, w13_scale, w2_scale, s13, s2, inter, int(config.get("fp8_acc", 0)),
                    int(config["w13"]["BN"]), align, ptx=_ptx_decode(x.device))
    return fused_experts_impl(x, w13, w2, topk_weights, topk_ids, act.name, on_input, w1_bias, w2_bias, expert_map,
                              swiglu_limit, config=config, warmup=warmup, quant=q)


def _vector_align(w: torch.Tensor) -> int:
    """Elements per 16-byte vector when every packed row of ``w [E, N, K/PACK]`` starts 16-byte aligned and
    holds whole vectors (the kernels may then load rows as vectors), else 1."""
    v = 16 // w.element_size()
    ok = (w.stride(2) == 1 and w.shape[2] % v == 0 and w.stride(1) % v == 0 and w.stride(0) % v == 0
          and w.data_ptr() % 16 == 0)
    return v if ok else 1


def _ptx_decode(device: torch.device) -> bool:
    """The packed-bf16 4-bit decode (:func:`._triton.w4_decode._decode_bf16`) needs a compiled kernel on sm_90+
    (``sub`` / ``mul .bf16x2``); older GPUs and the interpreter take the fp32 route (the same values). CPU
    tensors outside the interpreter only reach the launcher in ``benchmarks/compile_sm90.py`` (Hopper)."""
    if _interpreting():
        return False
    return device.type != "cuda" or _major(device) >= 9
