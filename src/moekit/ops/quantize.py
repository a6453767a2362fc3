"""Reference quantisation rules of SPEC §8: fp8 (block / channel / tensor), OCP MX fp4, int4 groups.

Element rules live in :mod:`._quant_rules`; this module applies them to whole weights
(:func:`quantize_weight` / :func:`dequantize_weight`, per shard for ``w13``) and to stacked experts
(:func:`quantize_experts` / :func:`dequantize_experts`, one expert at a time so memory stays bounded).

Layouts (``N`` output rows, ``K`` reduction length; ``w13``: ``N = 2I`` gate rows then up rows, or
``I`` for relu2; ``w2``: ``N = H``, ``K = I``):

- fp8 block ``(bn, bk)``: ``Wq [N, K] e4m3``, ``S [⌈N/bn⌉, ⌈K/bk⌉] fp32``; for w13 each shard has its own
  grid (gate grid rows, then up grid rows). ``W[n, k] = Wq[n, k] · S[n // bn, k // bk]``.
- fp8 channel: ``S [N] fp32``; fp8 tensor: ``S []`` (w2) or ``[shards]`` (w13: gate, up).
- mxfp4: ``codes [N, K/2] uint8`` (low nibble = even k), ``e8m0 [N, K/32] uint8``.
- int4 group ``g``: ``packed [N, K/8] int32``, ``scale [N, K/g]`` (the weights' float dtype).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .._checks import (FLOAT_DTYPES, as_float_dtype, check_finite, check_float_dtype, check_same_device, check_shape,
                       check_tensor)
from ._dequant_fast import fast_ok, fp8_block_dequantize_fast, int4_group_dequantize_fast, mxfp4_dequantize_fast
from ._eager import autocast_off
from ._quant_rules import (
    fp8_block_dequantize,
    fp8_block_quantize,
    fp8_rowwise_dequantize,
    fp8_rowwise_quantize,
    int4_group_dequantize,
    int4_group_quantize,
    mxfp4_dequantize,
    mxfp4_quantize,
)
from .formats import Fp8BlockFormat, Fp8ChannelFormat, Int4GroupFormat, Mxfp4Format, WeightFormat
from .quant_config import parse_quant_config

__all__ = [
    "fp8_block_quantize",
    "fp8_block_dequantize",
    "fp8_rowwise_quantize",
    "fp8_rowwise_dequantize",
    "mxfp4_quantize",
    "mxfp4_dequantize",
    "int4_group_quantize",
    "int4_group_dequantize",
    "quantize_weight",
    "dequantize_weight",
    "quantize_experts",
    "dequantize_experts",
    "expert_sizes",
    "check_quant_weights",
]


def _sharded(fmt: WeightFormat) -> bool:
    """Formats whose scales follow the w13 shards (gate / up) rather than single rows."""
    return isinstance(fmt, Fp8BlockFormat) or (isinstance(fmt, Fp8ChannelFormat) and fmt.per_tensor)


def _quantize_one(w: torch.Tensor, fmt: WeightFormat):
    if isinstance(fmt, Fp8BlockFormat):
        return fp8_block_quantize(w, fmt.block_n, fmt.block_k, ue8m0=fmt.ue8m0)
    if isinstance(fmt, Fp8ChannelFormat):
        return fp8_rowwise_quantize(w, per_tensor=fmt.per_tensor)
    if isinstance(fmt, Mxfp4Format):
        return mxfp4_quantize(w)
    if isinstance(fmt, Int4GroupFormat):
        return int4_group_quantize(w, fmt.group_size)
    raise TypeError(f"fmt must be a moekit weight format, got {type(fmt).__name__}")


def _dequantize_one(wq: torch.Tensor, scale: torch.Tensor, fmt: WeightFormat, dtype: torch.dtype) -> torch.Tensor:
    """The rule's values in ``dtype``: by the fast forms of :mod:`._dequant_fast` (the same bits) where they apply."""
    fast = fast_ok(wq, scale, isinstance(fmt, Mxfp4Format))
    if isinstance(fmt, Fp8BlockFormat):
        if fast:
            return fp8_block_dequantize_fast(wq, scale, fmt.block_n, fmt.block_k).to(dtype)
        return fp8_block_dequantize(wq, scale, fmt.block_n, fmt.block_k).to(dtype)
    if isinstance(fmt, Fp8ChannelFormat):
        return fp8_rowwise_dequantize(wq, scale).to(dtype)
    if isinstance(fmt, Mxfp4Format):
        return mxfp4_dequantize_fast(wq, scale, dtype) if fast else mxfp4_dequantize(wq, scale).to(dtype)
    if isinstance(fmt, Int4GroupFormat):
        if fast:
            return int4_group_dequantize_fast(wq, scale, fmt.group_size, dtype)
        return int4_group_dequantize(wq, scale, fmt.group_size).to(dtype)
    raise TypeError(f"fmt must be a moekit weight format, got {type(fmt).__name__}")


def _join_scales(scales: list[torch.Tensor], fmt: WeightFormat) -> torch.Tensor:
    return torch.cat(scales, dim=-2) if isinstance(fmt, Fp8BlockFormat) else torch.stack(scales, dim=-1)


def _split_scales(scale: torch.Tensor, fmt: WeightFormat, shards: int) -> list[torch.Tensor]:
    if isinstance(fmt, Fp8BlockFormat):
        return list(scale.chunk(shards, dim=-2))
    return list(scale.unbind(dim=-1))


@autocast_off  # (round 68: under torch.autocast the cat of fp8 shards raised from autocast's promotion)
def quantize_weight(w: torch.Tensor, fmt: WeightFormat, *, shards: int | None = None):
    """``W -> (Wq, S)`` by ``fmt``'s reference rule (see :mod:`._quant_rules`).

    w: [..., N, K] float (N divisible by ``shards``); shards: None for a plain matrix (w2), 1 or 2
    for w13 (its shards get their own block grid / per-tensor scale).
    returns: Wq [..., N, K / pack] ``fmt.weight_dtype``, S of the layout in the module docstring.
    """
    if shards is None or not _sharded(fmt):
        return _quantize_one(w, fmt)
    parts = [_quantize_one(p, fmt) for p in w.chunk(shards, dim=-2)]
    return torch.cat([p[0] for p in parts], dim=-2), _join_scales([p[1] for p in parts], fmt)


@autocast_off
def dequantize_weight(wq: torch.Tensor, scale: torch.Tensor, fmt: WeightFormat, *, shards: int | None = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(Wq, S) -> W``: the float32 product, then cast to ``dtype`` (computed by the faster forms of
    :mod:`._dequant_fast` where they apply, with the same bits).

    wq, scale: as :func:`quantize_weight` returns them. returns: [..., N, K] ``dtype``.
    """
    if shards is None or not _sharded(fmt):
        return _dequantize_one(wq, scale, fmt, dtype)
    parts = zip(wq.chunk(shards, dim=-2), _split_scales(scale, fmt, shards))
    return torch.cat([_dequantize_one(q, s, fmt, dtype) for q, s in parts], dim=-2)


def expert_sizes(fmt: WeightFormat, w13_q: torch.Tensor, w2_q: torch.Tensor,
                 names: tuple[str, str] = ("w13", "w2")) -> tuple[int, int, int, bool]:
    """``(E, I, H, gated)`` read from stored expert tensors ``w13_q [E, 2I|I, H/pack]``, ``w2_q [E, H, I/pack]``.
    ``names``: the two tensors' names in errors (``fused_experts`` calls them w1 / w2)."""
    n13, n2 = names
    for name, t in ((n13, w13_q), (n2, w2_q)):
        check_tensor(name, t)
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape [E, rows, cols], got {list(t.shape)}")
    e, hidden, inter = w2_q.shape[0], w2_q.shape[1], w2_q.shape[2] * fmt.pack
    if w13_q.shape[2] != hidden // fmt.pack:  # the sizes come from w2: name both when the pair disagrees on H
        raise ValueError(f"{n13} {list(w13_q.shape)} and {n2} {list(w2_q.shape)} disagree on H: {n13} must be "
                         f"[E, 2I|I, H/{fmt.pack}] and {n2} [E, H, I/{fmt.pack}] ({fmt.name} stores {fmt.pack} "
                         f"value(s) per element), so {n13}.shape[2] must be {hidden // fmt.pack} for H = {hidden}")
    rows = w13_q.shape[1]
    if rows != inter and rows != 2 * inter:  # not ``in (…)``: torch.compile traced that as False (mxfp4, H200)
        raise ValueError(f"{n13} must have 2I = {2 * inter} (gated) or I = {inter} (relu2) rows (I from {n2}), "
                         f"got {rows}")
    return e, inter, hidden, rows == 2 * inter


def check_quant_weights(fmt: WeightFormat, w13_q, w2_q, w13_scale, w2_scale, *, w13_input_scale=None,
                        w2_input_scale=None, names: tuple[str, str] = ("w13", "w2"),
                        sizes: tuple[int, int, int, bool] | None = None, hint: str = "") -> tuple[int, int, int, bool]:
    """Check stored expert tensors against ``fmt`` (shapes, dtypes, devices); return ``(E, I, H, gated)``.
    ``names``: the weights' names in errors (``fused_experts``: w1 / w2, so its scales read w1_scale ...).
    ``sizes``: the ``(E, I, H, gated)`` the tensors must hold (a layer's own): each tensor is checked against the
    format's shape for them and a wrong one is named with its expected shape, the sizes and ``hint`` (round 56: a
    layer's load read the sizes from w2, so a wrong w2 blamed w13); None: the sizes are read from the tensors
    (:func:`expert_sizes`)."""
    n13, n2 = names
    if sizes is None:
        e, inter, hidden, gated = expert_sizes(fmt, w13_q, w2_q, names)
        if min(e, inter, hidden) < 1:  # (round 64: "E must be a positive int", an argument nobody passed)
            raise ValueError(f"{n13} {list(w13_q.shape)} and {n2} {list(w2_q.shape)} hold E = {e}, I = {inter}, "
                             f"H = {hidden}; each must be >= 1")
    else:
        e, inter, hidden, gated = sizes
    fmt.validate(e, inter, hidden, gated)
    expected = (
        (n13, w13_q, fmt.w13_shape(e, inter, hidden, gated)),
        (n2, w2_q, fmt.w2_shape(e, inter, hidden, gated)),
        (f"{n13}_scale", w13_scale, fmt.w13_scale_shape(e, inter, hidden, gated)),
        (f"{n2}_scale", w2_scale, fmt.w2_scale_shape(e, inter, hidden, gated)),
    )

    def shaped(name, t, shape):  # ``t`` a tensor of ``shape``; with ``sizes`` the error says which sizes
        check_tensor(name, t)
        if sizes is not None and tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)} ({fmt.name} tensors of E = "
                             f"{e} experts, I = {inter}, H = {hidden}{'' if gated else ', not gated'}){hint}")
        check_shape(name, t, shape)

    for name, t, shape in expected:
        shaped(name, t, shape)
        if t.device != w13_q.device:
            raise ValueError(f"{name} is on {t.device} but {n13} is on {w13_q.device}; they must share a device")
    for name, t in ((n13, w13_q), (n2, w2_q)):
        if t.dtype != fmt.weight_dtype:
            raise TypeError(f"{name} must have dtype {fmt.weight_dtype} for {fmt.name}, got {t.dtype}")
    for name, t in ((f"{n13}_scale", w13_scale), (f"{n2}_scale", w2_scale)):
        if isinstance(fmt, Mxfp4Format) and t.dtype != torch.uint8:
            raise TypeError(f"{name} must be uint8 e8m0 exponents for mxfp4, got {t.dtype}")
        if not isinstance(fmt, Mxfp4Format):
            check_float_dtype(name, t, FLOAT_DTYPES)
    static = isinstance(fmt, Fp8ChannelFormat) and fmt.static_input
    for name, t in ((f"{n13}_input_scale", w13_input_scale), (f"{n2}_input_scale", w2_input_scale)):
        if static and t is None:
            raise ValueError(f"{name} is required: {fmt} quantises inputs with a static scale")
        if not static and t is not None:
            raise ValueError(f"{name} was given but {fmt.name} with static_input=False quantises inputs dynamically")
        if t is not None:
            shaped(name, t, (e,))
            check_float_dtype(name, t, FLOAT_DTYPES)
    return e, inter, hidden, gated


def quantize_experts(w13: torch.Tensor, w2: torch.Tensor, quant_config):
    """Quantise stacked experts by ``quant_config``'s reference rule, one expert at a time.

    w13: [E, 2I, H] (gate rows then up rows; [E, I, H] for relu2) float; w2: [E, H, I] float.
    returns: (w13_q, w2_q, w13_scale, w2_scale) in the format's layout (``fmt.w13_shape`` ...):
    fp8 block ``w13_scale [E, 2·⌈I/bn⌉, ⌈H/bk⌉]``, ``w2_scale [E, ⌈H/bn⌉, ⌈I/bk⌉]`` fp32; fp8 channel
    ``[E, 2I]`` / ``[E, H]`` (per tensor ``[E, 2]`` / ``[E]``) fp32; mxfp4 uint8 e8m0 ``[E, 2I, H/32]`` /
    ``[E, H, I/32]``; int4 ``[E, 2I, H/g]`` / ``[E, H, I/g]`` in the weights' dtype. A static-input fp8
    format needs calibrated input scales besides (not made here).

    The rules (SPEC §8; round 63 put them here): fp8, per block (row, tensor) ``S = amax / 448``, ue8m0
    ``S = 2^ceil(log2(amax / 448))``, an all-zero block ``S = 1``, ``Wq = e4m3(clamp(W / S, ±448))`` rounded to
    nearest even from the float32 quotient; mxfp4, OCP MX v1.0: a shared scale ``2^(floor(log2 amax) - 2)`` per 32
    along k (e8m0 bytes), elements e2m1 rounded to nearest, ties to even, saturating at 6; int4, compressed-tensors'
    symmetric rule: ``s = amax / 7.5`` per group (a zero ``s`` becomes the dtype's eps), ``q = round(clamp(W / s,
    -8, 7))`` half to even, in the weights' dtype, packed eight nibbles (``q + 8``) per int32.
    """
    fmt = parse_quant_config(quant_config)
    if fmt is None:
        raise ValueError("quant_config is None: there is nothing to quantise to")
    for name, t in (("w13", w13), ("w2", w2)):
        check_tensor(name, t)
        check_float_dtype(name, t, FLOAT_DTYPES)
        check_finite(name, t)
    check_same_device("w2", w2, "w13", w13)  # (round 62: a meta w2 beside a CPU w13 came back as four meta tensors)
    if w13.dim() != 3:
        raise ValueError(f"w13 must have shape [E, 2I, H] (or [E, I, H] for relu2), got {list(w13.shape)}")
    if w2.dim() != 3:
        raise ValueError(f"w2 must have shape [E, H, I], got {list(w2.shape)}")
    e, hidden, inter = w2.shape
    if min(e, hidden, inter) < 1:  # (round 64: "E must be a positive int", an argument nobody passed)
        raise ValueError(f"w2 must have shape [E, H, I] with E, H and I >= 1, got {list(w2.shape)}")
    rows = w13.shape[1]
    if w13.shape[0] != e or w13.shape[2] != hidden or rows not in (inter, 2 * inter):
        # the sizes come from w2, so name both: either may be the wrong one (e.g. w2 transposed)
        raise ValueError(f"w13 {list(w13.shape)} and w2 {list(w2.shape)} do not fit together: expected w13 "
                         f"[E, 2I, H] (or [E, I, H]) and w2 [E, H, I]; with w2's sizes w13 must have shape [E={e}, "
                         f"2I={2 * inter} or I={inter}, H={hidden}]")
    gated = rows == 2 * inter
    fmt.validate(e, inter, hidden, gated)
    int4 = isinstance(fmt, Int4GroupFormat)  # its scales keep the weights' dtype (compressed-tensors)
    dev = w13.device
    out = (
        torch.empty(fmt.w13_shape(e, inter, hidden, gated), dtype=fmt.weight_dtype, device=dev),
        torch.empty(fmt.w2_shape(e, inter, hidden, gated), dtype=fmt.weight_dtype, device=dev),
        torch.empty(fmt.w13_scale_shape(e, inter, hidden, gated), dtype=w13.dtype if int4 else fmt.scale_dtype,
                    device=dev),
        torch.empty(fmt.w2_scale_shape(e, inter, hidden, gated), dtype=w2.dtype if int4 else fmt.scale_dtype,
                    device=dev),
    )
    for i in range(e):
        out[0][i], out[2][i] = quantize_weight(w13[i], fmt, shards=2 if gated else 1)
        out[1][i], out[3][i] = quantize_weight(w2[i], fmt)
    return out


def dequantize_experts(w13_q, w2_q, w13_scale, w2_scale, quant_config, *, dtype: torch.dtype = torch.float32):
    """Reverse of :func:`quantize_experts`: ``W = Wq · S`` in float32, then cast to ``dtype``.

    w13_q, w2_q: the quantised stacks (``fmt.w13_shape`` / ``fmt.w2_shape``); w13_scale, w2_scale: their
    scales; quant_config: the format (HF dict or format object); dtype: the result's dtype.
    returns: (w13 [E, 2I|I, H], w2 [E, H, I]) ``dtype``.
    """
    fmt = parse_quant_config(quant_config)
    if fmt is None:
        raise ValueError("quant_config is None: the weights are not quantised")
    dtype = as_float_dtype("dtype", dtype)
    weights_only = replace(fmt, static_input=False) if isinstance(fmt, Fp8ChannelFormat) else fmt  # no input scales
    e, inter, hidden, gated = check_quant_weights(weights_only, w13_q, w2_q, w13_scale, w2_scale)
    w13 = torch.empty(e, 2 * inter if gated else inter, hidden, dtype=dtype, device=w13_q.device)
    w2 = torch.empty(e, hidden, inter, dtype=dtype, device=w13_q.device)
    for i in range(e):
        w13[i] = dequantize_weight(w13_q[i], w13_scale[i], fmt, shards=2 if gated else 1, dtype=dtype)
        w2[i] = dequantize_weight(w2_q[i], w2_scale[i], fmt, dtype=dtype)
    return w13, w2
