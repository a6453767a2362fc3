"""Element-level quantisation rules (SPEC §8), each a pure function over ``[..., N, K]`` tensors.

Every rule quantises along the last dimension ``K`` (the GEMM reduction) and keeps any leading
dimensions, so one call handles a matrix, one expert or a stack of experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._eager import expand_tiles, tiles_expanded

E4M3_MAX = 448.0
#: floor on a dynamic activation group's amax (an all-zero group gets a tiny, finite scale)
ACT_AMAX_FLOOR = 1e-10
#: magnitudes of the e2m1 codes 0..7 (bit 3 is the sign)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_EMAX = 2  # exponent of e2m1's largest normal (6 = 1.5 · 2^2)
E8M0_BIAS = 127


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """``2^ceil(log2 s)`` exactly for s > 0 (frexp: ``s = m · 2^e``, ``m ∈ [0.5, 1)``); ``+inf`` stays ``+inf``
    (frexp gives it exponent 0: round 49's audit saw an activation group holding inf scaled by 1, finite garbage)."""
    m, e = torch.frexp(s)
    return torch.where(torch.isinf(s), s, torch.ldexp(torch.ones_like(s), e - (m == 0.5).to(e.dtype)))


def _to_e4m3(v: torch.Tensor) -> torch.Tensor:
    """Clamp to ``±448`` then round to nearest-even e4m3 (torch's cast)."""
    return v.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def _group_amax(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """amax of |x| over ``[rows, cols]`` tiles of the last two dims (partial tiles padded with 0)."""
    *lead, n, k = x.shape
    nb, kb = _cdiv(n, rows), _cdiv(k, cols)
    padded = F.pad(x.abs(), (0, kb * cols - k, 0, nb * rows - n))
    return padded.view(*lead, nb, rows, kb, cols).amax(dim=(-3, -1))


def _expand(scale: torch.Tensor, rows: int, cols: int, n: int, k: int) -> torch.Tensor:
    """Broadcast a per-tile ``[..., ⌈n/rows⌉, ⌈k/cols⌉]`` tensor back to ``[..., n, k]``: ``out[..., i, j] =
    scale[..., i // rows, j // cols]``. While compiling it is an opaque op (:func:`moekit.ops._eager.tiles_expanded`):
    torch 2.13's CPU inductor miscompiled every form tried where a block is partial (``repeat_interleave`` + a slice,
    an index gather by ``arange(k) // cols`` on one row, an expanded view flattened and sliced): NaN or garbage."""
    if torch.compiler.is_compiling():
        return tiles_expanded(scale, rows, cols, n, k)
    return expand_tiles(scale, rows, cols, n, k)


def fp8_scale(amax: torch.Tensor, ue8m0: bool = False) -> torch.Tensor:
    """``S = amax / 448`` (ue8m0: ``2^ceil(log2(amax / 448))``); ``amax == 0 -> S = 1``; a non-zero ``amax`` whose
    ``S`` underflows to 0 gets the dtype's smallest subnormal. Same dtype as amax.

    The quotient is the correctly rounded one on every device: PyTorch's CUDA division by a Python scalar
    multiplies by the rounded reciprocal (``amax · fl(1/448)``, one ulp off for some inputs), which moved
    the CUDA twin 1.6e-2 away from the CPU twin and the kernels (measured on an H200); a tensor divisor
    takes the IEEE division path on both, as the kernels' ``amax / 448`` does."""
    s = amax / torch.full_like(amax, E4M3_MAX)
    if ue8m0:  # the exponent of the float64 quotient: exact below float32's normal range too (round 64: clamped to
        # 2^-126, the SPEC's 2^ceil(log2(amax / 448)) lost); a float32 quotient never crosses a power of two there
        t = amax.double() / E4M3_MAX
        s = torch.where(t > 0, _pow2_ceil(t), t).to(amax.dtype)
    # a non-zero amax whose quotient underflows (amax < ~6e-43 in float32): the dtype's smallest subnormal, not 0
    # (round 64: S = 0 gave NaN codes and a NaN layer output from finite weights); W / S still stays <= 448
    finfo = torch.finfo(amax.dtype)
    s = torch.where((s == 0) & (amax > 0), torch.full_like(s, finfo.tiny * finfo.eps), s)
    return torch.where(amax == 0, torch.ones_like(s), s)


# ---------------------------------------------------------------------------------------------- fp8
def fp8_block_quantize(w: torch.Tensor, block_n: int, block_k: int, *, ue8m0: bool = False):
    """Block fp8: ``S[i, j] = amax(|W[block i, j]|) / 448`` (ue8m0: ``2^ceil(log2(·))``), all-zero block
    ``S = 1``; ``Wq = e4m3(clamp(W / S, ±448))`` round to nearest-even, where ``W / S`` is the float32 quotient
    (rounded to float32 first, then to e4m3: a quotient a hair above an e4m3 tie rounds to even, as the kernels do;
    rounding the exact quotient instead moves ~0.1 % of elements one e4m3 step). Partial edge blocks allowed.

    w: [..., N, K] float (math in float32)
    returns: Wq [..., N, K] float8_e4m3fn, S [..., ⌈N/bn⌉, ⌈K/bk⌉] float32 (the dequantisation multiplier)
    """
    wf = w.float()
    n, k = w.shape[-2:]
    s = fp8_scale(_group_amax(wf, block_n, block_k), ue8m0)
    return _to_e4m3(wf / _expand(s, block_n, block_k, n, k)), s.float()


def fp8_block_dequantize(wq: torch.Tensor, scale: torch.Tensor, block_n: int, block_k: int) -> torch.Tensor:
    """``W[n, k] = Wq[n, k] · S[n // bn, k // bk]``. wq: [..., N, K] e4m3; scale: [..., ⌈N/bn⌉, ⌈K/bk⌉].
    returns: [..., N, K] float32."""
    n, k = wq.shape[-2:]
    return wq.float() * _expand(scale.float(), block_n, block_k, n, k)


def fp8_rowwise_quantize(w: torch.Tensor, *, per_tensor: bool = False):
    """Channel fp8: ``S[n] = amax(|W[n, :]|) / 448`` (per tensor: one ``S`` for the matrix), zero -> 1;
    ``Wq = e4m3(clamp(W / S, ±448))`` (the float32 quotient, as :func:`fp8_block_quantize`).

    w: [..., N, K] float (math in float32).
    returns: Wq [..., N, K] float8_e4m3fn, S [..., N] (per tensor: [...]) float32.
    """
    wf = w.float()
    amax = wf.abs().amax(dim=(-2, -1) if per_tensor else -1)
    s = fp8_scale(amax)
    full = s[..., None, None] if per_tensor else s[..., None]
    return _to_e4m3(wf / full), s.float()


def fp8_rowwise_dequantize(wq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``W = Wq · S`` with S [..., N] (per row) or [...] (per tensor). returns: [..., N, K] float32."""
    s = scale.float()
    return wq.float() * (s[..., None] if s.dim() == wq.dim() - 1 else s[..., None, None])


def quantize_fp8_activations(x: torch.Tensor, group_size: int | None = None, *, ue8m0: bool = False,
                             static_scale: torch.Tensor | float | None = None):
    """Activation fp8 (the torch twin of the kernels' input quantiser).

    Dynamic, per token ``t`` and group ``g`` of ``group_size`` along K (None: one group = the row):
    ``s[t, g] = max(amax|x[t, g]|, 1e-10) / 448`` (ue8m0: ``2^ceil(log2 s)``),
    ``x_q = e4m3(clamp(x / s, −448, 448))``. Static: ``s = static_scale`` for every element. ``x / s`` is the
    float32 quotient, as in the kernels and DeepSeek's reference quantiser (decision, round 49: the quantisation
    audit measured that rounding the exact quotient instead moves ~0.1 % of bf16 elements one e4m3 step, a relative
    RMS of up to 1.6e-2 on a layer's output; the float64 oracle of the tests quantises the same float32 quotient).

    x: [T, K] float (math in float32; float64 stays float64).
    returns: x_q [T, K] float8_e4m3fn, s [T, ⌈K/group⌉] (static: [T, 1]) float32 (float64 for float64 x),
    ``x ≈ x_q · s``.
    """
    xf = x.double() if x.dtype == torch.float64 else x.float()
    t, k = xf.shape
    if static_scale is not None:
        s = torch.as_tensor(static_scale, dtype=xf.dtype, device=xf.device).reshape(1, 1).expand(t, 1)
        return _to_e4m3(xf / s), s
    g = k if group_size is None else group_size
    s = fp8_scale(_group_amax(xf, 1, g).clamp_min(ACT_AMAX_FLOOR), ue8m0)
    return _to_e4m3(xf / _expand(s, 1, g, t, k)), s


def dequantize_fp8_activations(x_q: torch.Tensor, s: torch.Tensor, group_size: int | None = None, *,
                               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x = x_q · s[t, k // group]``, computed in ``dtype``. returns: [T, K] ``dtype`` (float32)."""
    t, k = x_q.shape
    return x_q.to(dtype) * _expand(s.to(dtype), 1, k if group_size is None else group_size, t, k)


# ---------------------------------------------------------------------------------------------- mxfp4
def _e2m1_index(a: torch.Tensor) -> torch.Tensor:
    """Magnitude ``a >= 0`` -> e2m1 index 0..7, round to nearest, ties to the even code, saturating at 6.

    Each midpoint counts when passed; ``>`` where the tie goes down to an even index, ``>=`` where it
    goes up to one (0|0.5 -> 0, 0.5|1 -> 1, 1|1.5 -> 1, 1.5|2 -> 2, 2|3 -> 2, 3|4 -> 4, 4|6 -> 4)."""
    idx = (a > 0.25).int() + (a >= 0.75).int() + (a > 1.25).int() + (a >= 1.75).int()
    return idx + (a > 2.5).int() + (a >= 3.5).int() + (a > 5.0).int()


def mxfp4_quantize(w: torch.Tensor):
    """OCP Microscaling Formats (MX) v1.0, §6.3 (MXFP4: e2m1 elements, e8m0 scale, blocks of 32 along K).

    Shared scale ``X = 2^(floor(log2(amax)) − emax_elem)`` with ``emax_elem = 2`` for e2m1, stored as
    e8m0 ``floor(log2 amax) − 2 + 127`` clamped to the valid codes ``[0, 254]``; an all-zero block gets
    code 127 (``X = 1``). Elements ``P = e2m1(W / X)``: round to nearest, ties to even, values past
    ±6 saturate to ±6 (the spec's conversion clamps to the element format's max normal). Codes: bit 3
    sign, bits 0-2 the index of ``|P|`` in ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}; zero is stored as +0.
    Packed two per byte, low nibble = even k.

    w: [..., N, K] float (math in float32), K % 32 == 0, finite.
    returns: codes [..., N, K/2] uint8, scale [..., N, K/32] uint8 (e8m0).
    """
    *lead, n, k = w.shape
    if k % 32:
        raise ValueError(f"mxfp4 needs K (the last dim) to be a multiple of 32, got {k}")
    wf = w.float().reshape(*lead, n, k // 32, 32)
    amax = wf.abs().amax(dim=-1)
    _, e = torch.frexp(amax)  # amax = m · 2^e, m in [0.5, 1) -> floor(log2 amax) = e - 1
    shared = torch.where(amax > 0, e - 1 - E2M1_EMAX, torch.zeros_like(e)).clamp(-E8M0_BIAS, E8M0_BIAS)
    v = torch.ldexp(wf, -shared[..., None])
    idx = _e2m1_index(v.abs())
    codes = (idx + 8 * ((v < 0) & (idx > 0)).int()).to(torch.uint8).reshape(*lead, n, k)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed, (shared + E8M0_BIAS).to(torch.uint8)


def mxfp4_dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``W[n, k] = e2m1(code[n, k]) · 2^(scale[n, k // 32] − 127)``. codes: [..., N, K/2] uint8;
    scale: [..., N, K/32] uint8. returns: [..., N, K] float32."""
    # the 16 code values made on the device (E2M1_VALUES, then negated: 2^(e-1)·(1 + f/2), e = 0: f/2), not copied from
    # the host: a blocking copy, which drained the stream between a backward's expert chunks (round 60 review)
    m = torch.arange(8, dtype=torch.int32, device=codes.device)
    e, f = m >> 1, (m & 1).float()
    mag = torch.where(e == 0, 0.5 * f, torch.ldexp(1.0 + 0.5 * f, e - 1))
    table = torch.cat([mag, -mag])
    c = torch.stack((codes & 0xF, codes >> 4), dim=-1).flatten(-2).long()
    vals = table[c]
    exp = scale.to(torch.int32) - E8M0_BIAS
    return torch.ldexp(vals, exp.repeat_interleave(32, dim=-1))


# ---------------------------------------------------------------------------------------------- int4
def int4_group_quantize(w: torch.Tensor, group_size: int):
    """compressed-tensors symmetric int4 ("pack-quantized"), as its source computes it:

    - ``calculate_qparams`` (``quantization/utils/helpers.py``): for symmetric args
      ``scale = max(|min|, |max|) / ((q_max − q_min) / 2)`` with ``q_min, q_max = −8, 7``
      (``calculate_range``), i.e. ``amax / 7.5`` per group, in the weights' dtype; a zero scale is
      replaced by that dtype's ``finfo.eps``.
    - ``_quantize`` / ``round_to_quantized_type_args`` (``lifecycle/forward.py``, ``quant_args.py``):
      ``q = round(clamp(W / scale, −8, 7))`` with ``torch.round`` (half to even), in the weights' dtype.
    - ``pack_to_int32`` (``compressors/quantized_compressors/pack_quantized.py``): ``q + 8`` as unsigned
      nibbles, eight per int32 along K, element ``j`` of each eight at bits ``4j`` (j = 0 lowest).

    w: [..., N, K] float, K divisible by group_size and by 8.
    returns: packed [..., N, K/8] int32, scale [..., N, K/g] (w's dtype).
    """
    *lead, n, k = w.shape
    if k % group_size or k % 8:
        raise ValueError(f"int4 needs K (the last dim) to be a multiple of group_size={group_size} and of 8, got {k}")
    wg = w.reshape(*lead, n, k // group_size, group_size)
    amax = wg.abs().amax(dim=-1)
    scale = amax / torch.full_like(amax, 7.5)  # the IEEE quotient on every device (see fp8_scale)
    scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(w.dtype).eps), scale)
    q = torch.round(torch.clamp(wg / scale[..., None], -8, 7)).to(torch.int64).reshape(*lead, n, k // 8, 8)
    shifts = torch.arange(0, 32, 4, device=w.device, dtype=torch.int64)
    word = ((q + 8) << shifts).sum(dim=-1)
    word = torch.where(word >= 2**31, word - 2**32, word)  # two's complement int32
    return word.to(torch.int32), scale


def int4_unpack(packed: torch.Tensor) -> torch.Tensor:
    """packed: [..., N, K/8] int32 -> signed values [..., N, K] int8 in [−8, 7] (nibble j at bits 4j, −8)."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    nib = (packed[..., None] >> shifts) & 0xF
    return (nib - 8).to(torch.int8).flatten(-2)


def int4_group_dequantize(packed: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """``W[n, k] = q[n, k] · s[n, k // g]``. packed: [..., N, K/8] int32; scale: [..., N, K/g].
    returns: [..., N, K] float32."""
    return int4_unpack(packed).float() * scale.float().repeat_interleave(group_size, dim=-1)
