"""The 4-bit weights' decode in the Triton grouped GEMMs (SPEC §8, weight-only), ``W[n, k]`` for one packed tile::

    mxfp4  W = e2m1(code) · 2^(e8m0 - 127)     code = nibble (low = even k), e2m1 = ±{0, .5, 1, 1.5, 2, 3, 4, 6}
    int4   W = (nibble - 8) · s[n, k // G]     eight nibbles per int32, element j at bits 4j

The dequantised tile is rounded to the activations' dtype in registers (never written to memory): by fp32 bit
arithmetic (any target, the interpreter) or by the packed-bf16 PTX (:data:`E2M1_BF16_ASM`, :data:`INT4_BF16_ASM`:
compiled, sm_90+, bf16 activations), the same values. Words in :mod:`..w4_layout`'s register-operand layout
(``RELAID``) are decoded where they lie and the tile permuted into k order (:func:`_relaid_k_order`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .quant import MXFP4, to_dt


@triton.jit
def _nib(p, j: tl.constexpr):
    return ((p >> (4 * j)) & 0xF) | 0x4B000000


@triton.jit
def _nib8(p, BN: tl.constexpr, BK: tl.constexpr):
    """int32 words [BN, BK/8] -> their eight nibbles [BN, BK] (element j of a word at bits 4j, k = 8·kk + j),
    as fp32 bit patterns ``0x4B000000 | nibble`` (= 2^23 + nibble). A join tree along new trailing axes,
    so the merge into k is a register renaming (each thread holds whole words)."""
    return _join8(_nib(p, 0), _nib(p, 1), _nib(p, 2), _nib(p, 3), _nib(p, 4), _nib(p, 5), _nib(p, 6), _nib(p, 7),
                  BN, BK)


@triton.jit
def _join8(q0, q1, q2, q3, q4, q5, q6, q7, BN: tl.constexpr, BK: tl.constexpr):
    """Eight tensors [..., BK/8] (element j of each word) -> [BN, BK] with k = 8·kk + j. join(x, y) adds a
    trailing axis; nesting makes the innermost join the leading of the three new axes: [.., a, b, c] holds
    j = 4a + 2b + c, so the innermost joins pair j with j + 4."""
    q = tl.join(tl.join(tl.join(q0, q4), tl.join(q2, q6)), tl.join(tl.join(q1, q5), tl.join(q3, q7)))
    return tl.reshape(q, (BN, BK))


@triton.jit
def _e2m1x2(p, BN: tl.constexpr, BK: tl.constexpr):
    """uint8 bytes [BN, BK/2] (two e2m1 codes, low nibble = even k) -> fp32 [BN, BK] with value
    ``e2m1(code) · 2^-126``: the code's sign at bit 31 and its 3 magnitude bits at bits 22-24 (exponent
    field = the e2m1 exponent, mantissa bit = its mantissa; code 1 (0.5) is the subnormal 2^-127). e2m1 has
    fp32's structure with bias 1, so one exact multiply by 2^126 gives the value."""
    b = p.to(tl.int32)
    lo = ((b & 7) << 22) | ((b & 8) << 28)
    hi = ((b & 0x70) << 18) | ((b & 0x80) << 24)
    c = tl.reshape(tl.join(lo, hi), (BN, BK))
    return c.to(tl.float32, bitcast=True)


@triton.jit
def _scale_f32(s, QUANT: tl.constexpr):
    """Group scales -> fp32: e8m0 ``2^(s - 127)`` from its exponent bits (s = 0: 2^-127, a subnormal)."""
    if QUANT == MXFP4:
        sb = s.to(tl.int32)
        return tl.where(sb == 0, 0x400000, sb << 23).to(tl.float32, bitcast=True)
    return s.to(tl.float32)


@triton.jit
def load_w_scales(s_row, k0, K, nmask, G: tl.constexpr, BK: tl.constexpr):
    """Raw scales of the K step at ``k0``: [BN, NG] with NG = ``BK // G`` groups (1 when ``BK < G``: the
    step lies in one group); 0 past K. s_row: [BN] pointers to each column's scale row. The grouped GEMMs
    load these two K steps ahead, in registers: too small for the pipeliner's async copies, and a load in
    the step that uses it would wait a full memory latency every step."""
    NG: tl.constexpr = (BK + G - 1) // G
    g = k0 // G + tl.arange(0, NG)
    return tl.load(s_row[:, None] + g[None, :], mask=nmask[:, None] & (g[None, :] < K // G), other=0)


# bf16 decode by packed-bf16 PTX (sm_90+: sub / mul .bf16x2), elementwise over bytes (mxfp4, four per
# call) or int32 words (int4). Every result is the exact value rounded once to bf16, as the fp32 route gives.
#
# mxfp4, per byte pair (b0, b1) spread to bytes 0 and 2 of y (prmt): a code's 3 magnitude bits land on
# bf16 bits 6-8 (exponent 7-8 = e2m1's exponent, mantissa bit 6) and its sign on bit 15, so the 16-bit
# pattern is e2m1 · 2^-126 (code 1, 0.5, the subnormal 2^-127); one exact multiply by 2^126, then by the
# e8m0 scale 2^(s - 127) as bf16 (s = 0: the subnormal 2^-127), rounded once. Low codes: (y & 0x000F000F)
# · 0x1040 = copies shifted by 6 (magnitude) and 12 (sign), no overlapping bits; high codes: (y & 0x00F000F0)
# · 0x104 (shifts 2 and 8). Outputs: $0 $1 low codes of bytes (0, 1) (2, 3), $2 $3 high codes; $4 the four
# bytes; $5 $6 the scales of bytes (0, 1) (2, 3).
def _e2m1_pair(out: int, y: str, mask: str, mul: str, scale: int) -> str:
    """One bf16x2 output of E2M1_BF16_ASM: the codes under ``mask`` in ``y``, placed, then scaled."""
    return (f"and.b32 u, {y}, {mask};\nmul.lo.u32 t, u, {mul};\nand.b32 t, t, 0x81C081C0;\n"
            f"mul.rn.bf16x2 t, t, c;\nmul.rn.bf16x2 ${out}, t, ${scale};\n")


E2M1_BF16_ASM = tl.constexpr(
    "\n{\n.reg .b32 y0, y1, u, t, c;\nmov.b32 c, 0x7E807E80;\n"
    "prmt.b32 y0, $4, 0, 0x4140;\nprmt.b32 y1, $4, 0, 0x4342;\n"
    + "".join(_e2m1_pair(o, y, m, k, sc) for o, y, m, k, sc in ((0, "y0", "0x000F000F", "0x1040", 5),
                                                               (1, "y1", "0x000F000F", "0x1040", 6),
                                                               (2, "y0", "0x00F000F0", "0x104", 5),
                                                               (3, "y1", "0x00F000F0", "0x104", 6)))
    + "}\n")

# int4, per int32 word (nibble j at bits 4j): nibbles j and j + 4 sit 16 bits apart, so (w >> 4j) &
# 0x000F000F | 0x43004300 is the bf16 pair (128 + q_j, 128 + q_{j+4}); minus 136 (exact), times the bf16
# group scale (rounded once). Outputs $0..$7: nibbles 0..7 as bf16; $8 the word; $9 its scale.
def _int4_pair(j: int) -> str:
    """Nibbles j and j + 4 of INT4_BF16_ASM's word as a bf16 pair, scaled, into outputs j and j + 4."""
    src = "$8" if j == 0 else "q"
    shift = "" if j == 0 else f"shr.u32 q, $8, {4 * j};\n"
    return (f"{shift}and.b32 t, {src}, 0x000F000F;\nor.b32 t, t, 0x43004300;\nsub.rn.bf16x2 t, t, c;\n"
            f"mul.rn.bf16x2 t, t, s2;\nmov.b32 {{${j}, ${j + 4}}}, t;\n")


INT4_BF16_ASM = tl.constexpr("\n{\n.reg .b32 t, q, c, s2;\nmov.b32 c, 0x43084308;\nmov.b32 s2, {$9, $9};\n"
                             + "".join(_int4_pair(j) for j in range(4)) + "}\n")


@triton.jit
def _decode_bf16(p, s, QUANT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NG: tl.constexpr):
    """Packed tile ``p`` ([BN, BK/2] uint8 or [BN, BK/8] int32) and its raw group scales ``s`` [BN, NG] ->
    [BN, BK] bf16 by the PTX above (compiled kernels only: the interpreter cannot run inline assembly)."""
    if QUANT == MXFP4:
        sb = s.to(tl.int32)
        sc = tl.where(sb == 0, 0x40, sb << 7).to(tl.int16).to(tl.bfloat16, bitcast=True)
        p3 = tl.reshape(p, (BN, NG, BK // NG // 2))
        lo, hi = tl.inline_asm_elementwise(E2M1_BF16_ASM, "=r,=r,=r,=r,r,r,r",
                                           [p3, tl.broadcast_to(sc[:, :, None], (BN, NG, BK // NG // 2))],
                                           dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
        w = tl.reshape(tl.join(lo, hi), (BN, BK))
    else:
        p3 = tl.reshape(p, (BN, NG, BK // NG // 8))
        q0, q1, q2, q3, q4, q5, q6, q7 = tl.inline_asm_elementwise(
            INT4_BF16_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,h",
            [p3, tl.broadcast_to(s[:, :, None], (BN, NG, BK // NG // 8))],
            dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
        w = _join8(q0, q1, q2, q3, q4, q5, q6, q7, BN, BK)
    return w


@triton.jit
def _relaid_k_order(w, BN: tl.constexpr, BK: tl.constexpr):
    """A K step decoded in :mod:`..w4_layout`'s register-operand order -> k order. Decoded where they lie, word
    4q + j's nibble 4c + jj (code c of pair 16 j + 4 jj + q) is at position ``32 q + 8 j + 4 c + jj``; one permute
    of the axes puts it at ``k = 32 j + 8 jj + 2 q + c``. No integer work on the packed words and the values each
    thread's (round 44 put the words back in SPEC order first: 1.5x (mxfp4) to 3.9x (int4) the instructions per
    K step of a compute-bound w2, round 45)."""
    return tl.reshape(tl.permute(tl.reshape(w, (BN, 4, 4, 2, 4)), (0, 2, 4, 1, 3)), (BN, BK))


@triton.jit
def load_packed_w(ptrs, s, k0, K, nmask, DT: tl.constexpr, QUANT: tl.constexpr, PACK: tl.constexpr,
                  G: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, EVEN_K: tl.constexpr, INTERP: tl.constexpr,
                  W_ALIGN: tl.constexpr = 1, PTX: tl.constexpr = False, RELAID: tl.constexpr = False):
    """[BK, BN] tile of ``W[n, k0 + k]`` in ``DT`` from packed weights, dequantised in registers.

    ptrs: [BN, BK / PACK] pointers to the packed words of k0 (memory order: k contiguous; uint8: 2 codes,
    int32: 8 nibbles); s: the step's raw scales (:func:`load_w_scales`); K: true length; ``W_ALIGN``: K / PACK
    is a multiple of it (the K-tail mask then covers whole vectors); ``PTX``: the target is sm_90+ (the
    packed-bf16 decode may run); ``RELAID``: the words are in :mod:`..w4_layout`'s register-operand layout
    (decoded where they lie by the same per-element arithmetic, each with its group's scale, then
    :func:`_relaid_k_order`: the same values; a last half chunk is loaded into a whole chunk's places first, the
    missing pairs zero, as SPEC's K-tail mask leaves them). The tile is
    unpacked along new trailing axes ([BN, BK/PACK, PACK] -> [BN, BK], no data movement), scaled per group
    as [BN, NG, BK/NG], rounded to ``DT``, passed through :func:`_k_order_barrier` (compiled, 16-bit ``DT``)
    and transposed for the dot.

    Values (exact in fp32, then one rounding to ``DT``: the twin's dequantisation): mxfp4
    ``(bits · 2^126) · 2^(s - 127)`` (:func:`_e2m1x2`); int4 ``((2^23 + nib) - (2^23 + 8)) · s``."""
    kp = tl.arange(0, BK // PACK)
    if EVEN_K:
        p = tl.load(ptrs, mask=nmask[:, None], other=0)
    elif RELAID:  # rows ending in a half chunk (:mod:`..w4_layout`): its lane groups spread to a whole chunk's places
        VEC: tl.constexpr = 32 // PACK  # elements per 16-byte lane group
        if k0 + BK > K:
            half = ptrs - (kp // VEC * (VEC // 2))[None, :]
            p = tl.load(half, mask=nmask[:, None] & (kp // (VEC // 2) % 2 == 0)[None, :], other=0)
        else:
            p = tl.load(ptrs, mask=nmask[:, None], other=0)
    else:  # the K tail in whole W_ALIGN vectors (the launcher checked K / PACK is a multiple): vector loads stay
        p = tl.load(ptrs, mask=nmask[:, None] & (kp[None, :] // W_ALIGN < (K - k0) // PACK // W_ALIGN), other=0)
    NG: tl.constexpr = (BK + G - 1) // G
    if RELAID:  # decoded where they lie: lane q's words of group g (:func:`_relaid_k_order`) take scale g
        tl.static_assert(BK == 128, "the register-operand layout is laid out per 128-value K step")
        s = tl.reshape(tl.broadcast_to(s[:, None, :], (BN, 4, NG)), (BN, 4 * NG))
    NP: tl.constexpr = 4 * NG if RELAID else NG  # the scale groups in the packed order
    # ``PTX`` (the launcher's: compiled, sm_90+, whose bf16x2 add/sub/mul it needs), bf16 activations (int4:
    # bf16 scales, groups of whole words): the packed-bf16 PTX decode
    if PTX and not INTERP and DT == tl.bfloat16 and (QUANT == MXFP4 or (s.dtype == tl.bfloat16 and G % 8 == 0)):
        w = _decode_bf16(p, s, QUANT, BN, BK, NP)
    else:
        if QUANT == MXFP4:
            w = _e2m1x2(p, BN, BK) * 8.507059173023462e37  # 2^126
        else:
            w = _nib8(p, BN, BK).to(tl.float32, bitcast=True) - 8388616.0  # 2^23 + 8
        w = tl.reshape(tl.reshape(w, (BN, NP, BK // NP)) * _scale_f32(s, QUANT)[:, :, None], (BN, BK))
        w = to_dt(w, DT, INTERP)
    if RELAID:
        w = _relaid_k_order(w, BN, BK)
    if not INTERP and DT != tl.float32:  # fp32 dots run as FMAs: no MMA operand layout to pin
        w = _k_order_barrier(w, DT)
    return tl.trans(w)


# An identity move with a side effect, between the decoded tile and the dot. Triton sizes mma.sync's
# per-thread K run (the dot operand's kWidth) from what its backward slice over pure elementwise ops reaches:
# from the packed words it chose kWidth 4 (int4) / 8 (mxfp4), and 4 for a bf16 operand made in registers,
# instead of 2 for one loaded from shared memory. That hands each MMA instruction another set of k and
# changes the fp32 sums' order, so mma.sync buckets (BLOCK_M 16 / 32) differed in the last bits from wgmma
# buckets (BLOCK_M >= 64, the tile through shared memory) and from the bf16 kernel on the same decoded
# weights (H200, benchmarks/bits_probe.py). A non-pure asm ends the slice here: kWidth 2, the bf16 order, in
# every bucket. The price: the decoded tile now goes through shared memory for mma.sync as well (H200,
# DeepSeek-V3 mxfp4 unswapped BLOCK_M 16, T = 8 750 -> 958 µs; gpt-oss mxfp4 got faster, 409 -> 282 µs).
# Marking the packed words and scales instead (decode left pure) gave kWidth 4: no fix.
@triton.jit
def _k_order_barrier(w, DT: tl.constexpr):
    if DT == tl.float16:
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [w], dtype=tl.float16, is_pure=False, pack=2)
    else:
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [w], dtype=tl.bfloat16, is_pure=False, pack=2)
