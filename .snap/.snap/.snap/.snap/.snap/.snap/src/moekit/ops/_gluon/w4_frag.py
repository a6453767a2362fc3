"""The register-operand 4-bit GEMMs' A fragments (:mod:`.w4_rega`): each thread decodes exactly its own elements of
the wgmma's A fragment (``DotOperandLayout``, kWidth 2) from a packed ring slot, by one inline-asm call per (row,
group, 4 words) on SPEC §8's packing (:func:`_frag_spec`, round 14) or per lane word on the register-operand layout of
:mod:`..w4_layout` (:func:`_frag_relaid`, ``RELAID``, round 44), and loads each K step's group scales in the layout
the decode takes (:func:`_frag_scales`). Why each instruction is there: :mod:`.w4_rega`'s docstring and
docs/kernels.md; the asm strings run through an emulator in ``tests/ops/test_w4_rega_asm.py``.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from .._triton.quant import MXFP4
from .w4_ring import _PLAIN
from .compat import smem_reinterpret


def _pair_sel(j: int, zero_fill: bool) -> str:
    """``prmt`` selector that puts byte j of ``lo`` (first source) into byte 0 and byte j of ``hi`` (second) into
    byte 2 of a word: one k pair's two codes at bits 0-3 and 16-19; ``zero_fill``: bytes 1 and 3 are zero (the
    sign of a byte < 0x80 replicated), else copies (masked afterwards)."""
    b1, b3 = (8 + j, 12 + j) if zero_fill else (j, 4 + j)
    return hex(j | b1 << 4 | (4 + j) << 8 | b3 << 12)


# One asm per (row, group, 4 words): $4 $6 $8 $10 the words (odd operands: the same words again, the pair dim's
# broadcast), $12 the thread's byte selector ``q | (q + 4) << 4``, $20 the group scale as bf16x2. Gather byte q of
# each word (3 prmt: byte j of g = k pair 4j + q), split the low (even k) and high (odd k) codes, then per k pair j
# one prmt places its two codes 16 bits apart and the decode writes output j as the bf16x2 pair (even k, odd k):
# the fragment's register, so no repacking follows.
_GATHER = "prmt.b32 t0, $4, $6, $12;\nprmt.b32 t1, $8, $10, $12;\nprmt.b32 g, t0, t1, 0x5410;\n"
# the codes' high nibbles moved down by 4 (round 19: a mul.hi by 2^28, the FMA pipe instead of the integer one, made
# the steps 1-2 % slower)
_SHR4 = "shr.u32 hi, g, 4;\n"
# mxfp4: (lo, hi) codes clean at bits 0-3 / 16-19, then the same placing and two multiplies as
# :data:`.._triton.w4_decode.E2M1_BF16_ASM` (x 2^126, then x the e8m0 scale as bf16): the same value, rounded once
def _e2m1_pairs(scale: str) -> str:
    """The mxfp4 pairs asm around ``scale``, the instructions that leave the e8m0 byte of the call's group as u32 in
    both halves' bits 7-14 of ``s`` (the bf16 exponent field)."""
    return ("\n{\n.reg .b32 t0, t1, g, lo, hi, y, c, s;\n" + _GATHER
            + "and.b32 lo, g, 0x0F0F0F0F;\n" + _SHR4 + "and.b32 hi, hi, 0x0F0F0F0F;\nmov.b32 c, 0x7E807E80;\n"
            + scale + "mov.b32 y, 0x00400040;\nmax.u16x2 s, s, y;\n"
            + "".join(f"prmt.b32 y, lo, hi, {_pair_sel(j, True)};\nmul.lo.u32 y, y, 0x1040;\n"
                      f"and.b32 y, y, 0x81C081C0;\nmul.rn.bf16x2 y, y, c;\nmul.rn.bf16x2 ${j}, y, s;\n" for j in range(4))
            + "}\n")


_E2M1_PAIRS = gl.constexpr(_e2m1_pairs("mul.lo.u32 s, $20, 0x00800080;\n"))
# the same with the row's four group scales as one u32 word ($20, one load: ``SWORD``) and the call's group selector
# $28 (``j | 4 << 4 | j << 8 | 4 << 12``: byte j and a zero byte, twice), so no byte is unpacked outside the asm
_E2M1_PAIRS_W = gl.constexpr(_e2m1_pairs("prmt.b32 s, $20, 0, $28;\nmul.lo.u32 s, s, 0x80;\n"))
#: group j's selector for $28 is ``j * _GSEL_MUL + _GSEL_ADD``
_GSEL_MUL = gl.constexpr(0x101)
_GSEL_ADD = gl.constexpr(0x4040)
# int4 (two nibbles of a little-endian word per byte, low = even k): (128 + q) - 136 times the bf16 scale, rounded
# once, as :data:`.._triton.w4_decode.INT4_BF16_ASM`; one lop3 (``(y & 0x000F000F) | 0x43004300``) drops the neighbouring
# nibbles the prmt brought along and sets the exponent
_INT4_PAIRS = gl.constexpr(
    "\n{\n.reg .b32 t0, t1, g, hi, y, c;\n" + _GATHER + _SHR4 + "mov.b32 c, 0x43084308;\n"
    + "".join(f"prmt.b32 y, g, hi, {_pair_sel(j, False)};\nlop3.b32 y, y, 0x000F000F, 0x43004300, 0xEA;\n"
              f"sub.rn.bf16x2 y, y, c;\nmul.rn.bf16x2 ${j}, y, $20;\n" for j in range(4))
    + "}\n")
# ``RELAID`` (weights in :mod:`..w4_layout`'s register-operand layout): one call per (row, word), the thread's own
# word $4 (pack 8: the same word eight times) holding four k pairs, pair jj's low codes at nibble jj and high codes at
# nibble 4 + jj, then the scale ($12; ``SWORD``: the scale word, and the group selector at $20). No gather and no split:
# mxfp4 pairs 0 / 1 are masked in place (codes at bits 0-3 / 4-7 of each half) and placed by one multiply (0x1040:
# << 6 and << 12; 0x104: << 2 and << 8: the same bf16 bits 6-8 and 15), pairs 2 / 3 the same after one shift by 8; the
# same arithmetic as :func:`_e2m1_pairs` after the mask, so the same values
def _e2m1_relaid(scale: str) -> str:
    """The re-laid mxfp4 asm around ``scale`` (as :func:`_e2m1_pairs`'s)."""
    parts = (("$4", "0x000F000F", "0x1040"), ("$4", "0x00F000F0", "0x104"), ("w2", "0x000F000F", "0x1040"),
             ("w2", "0x00F000F0", "0x104"))
    return ("\n{\n.reg .b32 w2, y, c, s;\nmov.b32 c, 0x7E807E80;\n" + scale
            + "mov.b32 y, 0x00400040;\nmax.u16x2 s, s, y;\nshr.u32 w2, $4, 8;\n"
            + "".join(f"and.b32 y, {src}, {mask};\nmul.lo.u32 y, y, {mul};\nand.b32 y, y, 0x81C081C0;\n"
                      f"mul.rn.bf16x2 y, y, c;\nmul.rn.bf16x2 ${j}, y, s;\n"
                      for j, (src, mask, mul) in enumerate(parts))
            + "}\n")


_E2M1_RELAID = gl.constexpr(_e2m1_relaid("mul.lo.u32 s, $12, 0x00800080;\n"))
_E2M1_RELAID_W = gl.constexpr(_e2m1_relaid("prmt.b32 s, $12, 0, $20;\nmul.lo.u32 s, s, 0x80;\n"))
# int4 re-laid: pair jj's nibbles at bits 4 jj and 16 + 4 jj: a shift by 4 jj, then :data:`_INT4_PAIRS`' lop3, sub
# and multiply (the bf16 exponent leaves no room for a nibble at bits 4-7, so every pair but the first is shifted)
_INT4_RELAID = gl.constexpr(
    "\n{\n.reg .b32 y, c;\nmov.b32 c, 0x43084308;\n"
    + "".join((f"shr.u32 y, $4, {4 * j};\n" if j else "")
              + f"lop3.b32 y, {'y' if j else '$4'}, 0x000F000F, 0x43004300, 0xEA;\nsub.rn.bf16x2 y, y, c;\n"
              f"mul.rn.bf16x2 ${j}, y, $12;\n" for j in range(4))
    + "}\n")
_MXR_IO = gl.constexpr("=r,=r,=r,=r," + ",".join(["r"] * 16))
_MXRW_IO = gl.constexpr("=r,=r,=r,=r," + ",".join(["r"] * 24))
_I4R_IO = gl.constexpr("=r,=r,=r,=r," + ",".join(["r"] * 12))
# four bf16x2 outputs; the 8 words and 8 selectors of one call (pack 8: 4 words x the code pair), then its scale:
# mxfp4 the e8m0 byte as 8 u32 (the asm makes the bf16x2 scale), int4 the bf16 scale as 4 bf16x2 pairs
_MX_IO = gl.constexpr("=r,=r,=r,=r," + ",".join(["r"] * 24))
# ``SWORD``: the scale words, then 8 copies of the group selector
_MXW_IO = gl.constexpr("=r,=r,=r,=r," + ",".join(["r"] * 32))
_I4_IO = gl.constexpr("=r,=r,=r,=r," + ",".join(["r"] * 20))


@gluon.constexpr_function
def _words_layout(BN, NG, W32, num_warps):
    """[BN, NG, W32, 4, 2]: packed words of a tile (W32 per scale group) against the quad lane q that keeps byte q
    of each and the two codes of that byte (k even, k odd): the wgmma A fragment's rows and k pairs (module
    docstring), the pair in one register, the words in consecutive registers (16-byte shared loads)."""
    reg = [[0, 0, 0, 0, 1]] + [[0, 0, 1 << i, 0, 0] for i in range((W32 - 1).bit_length())]
    reg += [[0, 1 << i, 0, 0, 0] for i in range((NG - 1).bit_length())] + [[8, 0, 0, 0, 0]]
    lane = [[0, 0, 0, 1, 0], [0, 0, 0, 2, 0], [1, 0, 0, 0, 0], [2, 0, 0, 0, 0], [4, 0, 0, 0, 0]]
    warp = [[16 << i, 0, 0, 0, 0] for i in range((num_warps - 1).bit_length())]
    return gl.DistributedLinearLayout(reg, lane, warp, [], [BN, NG, W32, 4, 2])


@gluon.constexpr_function
def _relaid_layout(BN, NG, J, num_warps):
    """[BN, NG, J, 4, 4, 2] (``RELAID``): :func:`_words_layout`'s register / lane / warp map with its word dim split
    into (J, 4): a group's G / 32 words of a lane and the four k pairs of each (so the same [BN, BK] after the
    reshape), the lane q dim next, the pair's two codes last."""
    reg = [[0, 0, 0, 0, 0, 1], [0, 0, 0, 1, 0, 0], [0, 0, 0, 2, 0, 0]]
    reg += [[0, 0, 1 << i, 0, 0, 0] for i in range((J - 1).bit_length())]
    reg += [[0, 1 << i, 0, 0, 0, 0] for i in range((NG - 1).bit_length())] + [[8, 0, 0, 0, 0, 0]]
    lane = [[0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 2, 0], [1, 0, 0, 0, 0, 0], [2, 0, 0, 0, 0, 0], [4, 0, 0, 0, 0, 0]]
    warp = [[16 << i, 0, 0, 0, 0, 0] for i in range((num_warps - 1).bit_length())]
    return gl.DistributedLinearLayout(reg, lane, warp, [], [BN, NG, J, 4, 4, 2])


#: a re-laid ring slot as u32 [BN, NG, J, 4 lanes]: in memory row, lane, group, word (a lane's words contiguous)
_RELAID_SMEM = gl.constexpr(gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 3, 0]))


@gluon.jit
def _frag_relaid(p_slot, s, QUANT: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, G: gl.constexpr,
                 ACC_L: gl.constexpr, num_warps: gl.constexpr, SWORD: gl.constexpr = False):
    """:func:`_frag` of a ring slot in the register-operand layout (:mod:`..w4_layout`): each thread loads its own
    words (one 16-byte load per row) and decodes them in place; the same values in the same fragment."""
    gl.static_assert(BK == 128, "the register-operand layout is laid out per 128-value K step")
    NG: gl.constexpr = BK // G
    J: gl.constexpr = G // 32
    L6: gl.constexpr = _relaid_layout(BN, NG, J, num_warps)
    words = smem_reinterpret(p_slot, gl.uint32, [BN, NG, J, 4], _RELAID_SMEM).load(
        gl.SliceLayout(3, gl.SliceLayout(5, L6)))
    w6 = gl.expand_dims(gl.expand_dims(words, 3), 5)
    w6, _ = gl.broadcast(w6, gl.zeros([1, 1, 1, 4, 1, 2], gl.uint32, L6))
    S6: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, gl.SliceLayout(5, L6))))
    if SWORD:
        sc = gl.convert_layout(s, gl.SliceLayout(1, S6))
        sc6 = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(sc, 1), 2), 3), 4), 5)
        j = gl.arange(0, NG, layout=gl.SliceLayout(0, S6))
        gsel = (j * _GSEL_MUL + _GSEL_ADD).to(gl.uint32)
        gsel6 = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(gsel, 0), 2), 3), 4), 5)
        w6, sc6 = gl.broadcast(w6, sc6)
        w6, gsel6 = gl.broadcast(w6, gsel6)
        w = gl.inline_asm_elementwise(_E2M1_RELAID_W, _MXRW_IO, [w6, sc6, gsel6], dtype=gl.bfloat16, is_pure=True,
                                      pack=8)
    else:
        sc = gl.convert_layout(s.to(gl.uint32) if QUANT == MXFP4 else s, S6)
        sc6 = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(sc, 2), 3), 4), 5)
        w6, sc6 = gl.broadcast(w6, sc6)
        if QUANT == MXFP4:
            w = gl.inline_asm_elementwise(_E2M1_RELAID, _MXR_IO, [w6, sc6], dtype=gl.bfloat16, is_pure=True, pack=8)
        else:
            w = gl.inline_asm_elementwise(_INT4_RELAID, _I4R_IO, [w6, sc6], dtype=gl.bfloat16, is_pure=True, pack=8)
    w = gl.reshape(w, [BN, BK])  # k = 2 · (16 · (J · g + j) + 4 · jj + q) + code: as :func:`_frag`'s
    return gl.convert_layout(w, gl.DotOperandLayout(operand_index=0, parent=ACC_L, k_width=2))


@gluon.jit
def _frag(p_slot, s, QUANT: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, G: gl.constexpr,
          ACC_L: gl.constexpr, num_warps: gl.constexpr, SWORD: gl.constexpr = False, RELAID: gl.constexpr = False):
    """The A fragment of one ring slot: :func:`_frag_relaid` for weights in the register-operand layout
    (``RELAID``), else :func:`_frag_spec` (SPEC §8's packing)."""
    if RELAID:
        w = _frag_relaid(p_slot, s, QUANT, BN, BK, G, ACC_L, num_warps, SWORD)
    else:
        w = _frag_spec(p_slot, s, QUANT, BN, BK, G, ACC_L, num_warps, SWORD)
    return w


@gluon.jit
def _frag_spec(p_slot, s, QUANT: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, G: gl.constexpr,
               ACC_L: gl.constexpr, num_warps: gl.constexpr, SWORD: gl.constexpr = False):
    """The A fragment (bf16 [BN, BK], ``DotOperandLayout(0, ACC_L, 2)``) of one packed ring slot ``p_slot`` and its
    raw group scales ``s`` ([BN, NG] in the words layout's row / group slice; ``SWORD``: [BN] u32, each row's four
    e8m0 bytes; loaded by :func:`_frag_scales`)."""
    NG: gl.constexpr = BK // G
    W32: gl.constexpr = G // 8  # 4-byte words per group: 16 bytes (mxfp4: 32 codes) or 4 int32 words of 8 nibbles
    L5: gl.constexpr = _words_layout(BN, NG, W32, num_warps)
    words = smem_reinterpret(p_slot, gl.uint32, [BN, NG, W32], _PLAIN).load(gl.SliceLayout(3, gl.SliceLayout(4, L5)))
    q = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(4, L5)))))
    sel = gl.expand_dims((q | ((q + 4) << 4))[None, None, None, :], 4)
    if SWORD:  # the row's word, the same for its NG groups; the group picks its byte inside the asm
        sc = gl.expand_dims(s, 1)
    elif QUANT == MXFP4:  # the e8m0 byte; the asm makes the bf16 scale 2^(s - 127) (s = 0: the subnormal 2^-127)
        sc = s.to(gl.uint32)
    else:
        sc = s
    w5 = gl.expand_dims(gl.expand_dims(words, 3), 4)
    sc5 = gl.expand_dims(gl.expand_dims(gl.expand_dims(sc, 2), 3), 4)
    w5, sel5 = gl.broadcast(w5, sel)
    w5, sc5 = gl.broadcast(w5, sc5)
    w5, pair = gl.broadcast(w5, gl.zeros([1, 1, 1, 1, 2], gl.uint32, L5))
    sel5, _ = gl.broadcast(sel5, pair)
    sc5, _ = gl.broadcast(sc5, pair)
    if SWORD:
        j = gl.arange(0, NG, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, L5)))))
        gsel = gl.expand_dims(gl.expand_dims(gl.expand_dims((j * _GSEL_MUL + _GSEL_ADD).to(gl.uint32)[None, :], 2), 3),
                              4)
        w5, gsel5 = gl.broadcast(w5, gsel)
        w = gl.inline_asm_elementwise(_E2M1_PAIRS_W, _MXW_IO, [w5, sel5, sc5, gsel5], dtype=gl.bfloat16, is_pure=True,
                                      pack=8)
    elif QUANT == MXFP4:
        w = gl.inline_asm_elementwise(_E2M1_PAIRS, _MX_IO, [w5, sel5, sc5], dtype=gl.bfloat16, is_pure=True, pack=8)
    else:
        w = gl.inline_asm_elementwise(_INT4_PAIRS, _I4_IO, [w5, sel5, sc5], dtype=gl.bfloat16, is_pure=True, pack=8)
    w = gl.reshape(w, [BN, BK])  # k = 2 · (G/2 · g + 4 · word + q) + code
    return gl.convert_layout(w, gl.DotOperandLayout(operand_index=0, parent=ACC_L, k_width=2))


@gluon.jit
def _frag_scales(ws_base, n0, N, stride_wsn, k, NKG, BN: gl.constexpr, BK: gl.constexpr, G: gl.constexpr,
                 EVEN_K: gl.constexpr, num_warps: gl.constexpr, SWORD: gl.constexpr = False):
    """Raw group scales [BN, NG] of K step ``k`` for rows n0.. in the layout :func:`_frag` takes (0 past K): a
    row's NG scales in consecutive registers, one vector load where the row stride allows (``EVEN_K``: the mask
    is the same for the whole row). ``SWORD`` (mxfp4, NG = 4, ``EVEN_K``, scale rows a multiple of 4 bytes): the
    row's four e8m0 bytes as one u32 [BN] (0 past K)."""
    NG: gl.constexpr = BK // G
    S_L: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, _words_layout(BN, NG, G // 8,
                                                                                           num_warps))))
    n = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, S_L))
    if SWORD:
        ptr = (ws_base + n.to(gl.int64) * stride_wsn + k * NG).to(gl.pointer_type(gl.uint32))
        out = gl.load(ptr, mask=(n < N) & (k * NG < NKG), other=0)
    else:
        g = k * NG + gl.arange(0, NG, layout=gl.SliceLayout(0, S_L))
        if EVEN_K:
            mask = (n < N)[:, None] & (k * NG < NKG)
        else:
            mask = (n < N)[:, None] & (g < NKG)[None, :]
        out = gl.load(ws_base + n.to(gl.int64)[:, None] * stride_wsn + g[None, :], mask=mask, other=0)
    return out
