"""Faster dequantisation with the bits of the rules in :mod:`._quant_rules` (the CPU path's main cost).

The rules (``mxfp4_dequantize``, ``int4_group_dequantize``, ``fp8_block_dequantize``) define the values; these
functions compute the same values, bit for bit, with fewer passes over memory:

- 4-bit: one table lookup per *byte* (two values: the low nibble first, as stored) instead of unpacking nibbles,
  then one broadcast multiply by the per-group scale (``[..., K/g, 1]``), not a ``repeat_interleave`` of the scales.
  mxfp4 into bf16 multiplies in bf16: ``e2m1 · 2^e`` has at most two significant bits and bf16 shares float32's
  exponent range, so the float32 product is exact and rounds to the same bf16 (checked over every byte and scale).
  int4 into bf16 with bf16 scales likewise (``q · s``: at most 4 + 8 significant bits, exact in float32).
- fp8 block: one multiply of a padded ``[nb, bn, kb, bk]`` view by the ``[nb, 1, kb, 1]`` scales, not two
  ``repeat_interleave`` passes building a full-size scale matrix.

:func:`fast_ok` says when they apply: not while tracing / capturing (the rules' traceable forms run there), not on
meta tensors, not with scales that take gradients, and for mxfp4 not with the e8m0 byte 255 (the rule's ``ldexp`` by
2^128 stays finite where a float32 ``2^128`` factor is inf; layers refuse 255 at load, the functional ops may see it).
Measured in ``benchmarks/results/cpu_dequant-*.json`` (``benchmarks/bench_cpu_quant.py``).
"""

from __future__ import annotations

import sys

import torch

from .._checks import host_sync_allowed


def fast_ok(wq: torch.Tensor, scale: torch.Tensor, mxfp4: bool) -> bool:
    """Whether the fast forms may run on these tensors (module docstring); mxfp4 reads its scales on the host."""
    if sys.byteorder != "little" or not host_sync_allowed() or wq.device.type == "meta" or scale.requires_grad:
        return False  # (the byte tables read two values from one wide integer in memory order)
    if not mxfp4:
        return True
    return wq.dtype == scale.dtype == torch.uint8 and not bool((scale == 255).any())


def _pair_table(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """byte -> (value of its low nibble, value of its high nibble) in ``dtype``, as one wide integer per byte
    (``[256]`` int32 for 2-byte dtypes, int64 for float32) whose memory is the two values in order."""
    b = torch.arange(256, device=values.device)
    pair = torch.stack((values[b & 0xF], values[b >> 4]), dim=-1).to(dtype).contiguous()  # [256, 2]
    return pair.view(torch.int32 if pair.element_size() == 2 else torch.int64).reshape(256)


def _lookup(table: torch.Tensor, data: torch.Tensor, dtype: torch.dtype, group: int) -> torch.Tensor:
    """Bytes ``data [..., N, B]`` (two values each) -> ``[..., N, 2B / group, group]`` values in ``dtype``."""
    flat = data.reshape(-1).long()
    vals = table.index_select(0, flat).view(dtype)
    return vals.view(*data.shape[:-1], data.shape[-1] * 2 // group, group)


def _e2m1_values(device) -> torch.Tensor:
    """The 16 codes' values, made as :func:`._quant_rules.mxfp4_dequantize` makes them."""
    m = torch.arange(8, dtype=torch.int32, device=device)
    e, f = m >> 1, (m & 1).float()
    mag = torch.where(e == 0, 0.5 * f, torch.ldexp(1.0 + 0.5 * f, e - 1))
    return torch.cat([mag, -mag])


def _e8m0_factor(scale: torch.Tensor) -> torch.Tensor:
    """e8m0 bytes 0..254 -> ``2^(byte - 127)`` float32, from its exponent bits (byte 0: the subnormal 2^-127), as the
    kernels make it: exact, whatever torch's default dtype (review of round 68: ``torch.pow(2.0, int tensor)`` took a
    float16 default and gave 0 / inf)."""
    s = scale.to(torch.int32)
    return torch.where(s == 0, 1 << (23 - 1), s << 23).view(torch.float32)


def mxfp4_dequantize_fast(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``mxfp4_dequantize(codes, scale).to(dtype)``, the same bits (no byte 255 in ``scale``: :func:`fast_ok`).
    codes: [..., N, K/2] uint8; scale: [..., N, K/32] uint8. returns: [..., N, K] ``dtype``."""
    work = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32  # (fp16 cannot hold 2^-127: float32)
    vals = _lookup(_pair_table(_e2m1_values(codes.device), work), codes, work, 32)
    factor = _e8m0_factor(scale).to(work)
    return (vals * factor.unsqueeze(-1)).flatten(-2).to(dtype)


def int4_group_dequantize_fast(packed: torch.Tensor, scale: torch.Tensor, group_size: int,
                               dtype: torch.dtype) -> torch.Tensor:
    """``int4_group_dequantize(packed, scale, group_size).to(dtype)``, the same bits.
    packed: [..., N, K/8] int32 (nibble j at bits 4j: bytes in order on a little-endian host); scale: [..., N, K/g]."""
    work = torch.bfloat16 if dtype == torch.bfloat16 and scale.dtype == torch.bfloat16 else torch.float32
    values = torch.arange(16, dtype=torch.float32, device=packed.device) - 8
    data = packed.contiguous().view(torch.uint8)  # [..., N, K/2]
    vals = _lookup(_pair_table(values, work), data, work, group_size)
    return (vals * scale.to(work).unsqueeze(-1)).flatten(-2).to(dtype)


def fp8_block_dequantize_fast(wq: torch.Tensor, scale: torch.Tensor, block_n: int, block_k: int) -> torch.Tensor:
    """``fp8_block_dequantize(wq, scale, block_n, block_k)``, the same bits. wq: [..., N, K] e4m3;
    scale: [..., ⌈N/bn⌉, ⌈K/bk⌉]. returns: [..., N, K] float32."""
    n, k = wq.shape[-2:]
    nb, kb = scale.shape[-2:]
    lead = wq.shape[:-2]
    out = torch.empty(*lead, nb * block_n, kb * block_k, dtype=torch.float32, device=wq.device)
    if nb * block_n != n or kb * block_k != k:
        out.zero_()  # (the padding is multiplied too: keep it finite)
    out[..., :n, :k] = wq
    out.view(*lead, nb, block_n, kb, block_k).mul_(scale.float()[..., :, None, :, None])
    return out if out.shape[-2:] == (n, k) else out[..., :n, :k].contiguous()  # (contiguous, as the rule's)
