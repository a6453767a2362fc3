"""mxfp4 / int4 (weight-only) swapped grouped GEMMs with the decoded weights as wgmma's register operand (Gluon).

The math and the bits are :mod:`.w4`'s swapped kernels (decode tiles, T small): per output tile (BN weight rows
of one expert, the BM token rows of one row block) and K step ``k`` of BK::

    W   = decode(packed[e, n, k·BK:(k+1)·BK], scales)       bf16 [BN, BK], exact value rounded once
    acc = acc + W · x[rows, k·BK:(k+1)·BK]ᵀ                  (bf16 wgmma m64, fp32 accumulator, k16 in order)

then the same epilogues. What differs is where ``W`` lives: :mod:`.w4` stores the decoded tile in shared memory
for the wgmma to read (four times the packed bytes, written and read once each per step); here each thread
decodes exactly its own elements of the wgmma's A fragment (``DotOperandLayout``, kWidth 2) in registers, and the
wgmma takes them from there. In the fragment, thread ``4r + q`` of a warp holds rows r and r + 8 and, of every
k16 block, the k pairs q and q + 4: packed byte ``j = k / 2`` of a row is one k pair (mxfp4: two e2m1 codes;
int4: two nibbles of a word, little-endian), so a thread needs byte q of every 4-byte word of its rows. The
four threads of a quad read the same words from the packed ring (16-byte shared loads, broadcast).

The decode is one inline-asm call per (row, group, 4 words), written for this fragment (round 14): gather byte q
of the 4 words (3 ``prmt``), split the low (even k) and high (odd k) codes once per word, then per k pair one
``prmt`` puts its two codes 16 bits apart and the arithmetic of the Triton kernels' packed-bf16 PTX turns them into
the bf16x2 register the fragment holds (mxfp4: place, x 2^126, x the e8m0 scale; int4: ``(128 + q) - 136``, x the
bf16 scale; each value rounded once, as there). No repacking follows, and a row's K-step scales arrive in one
vector load (mxfp4: the e8m0 bytes, turned into the bf16x2 scale inside the asm).

Measured on the H200 (docs/kernels.md, rounds 13 and 14): the same bits as the Triton kernels. Round 13's form
(a decode to (low, low) / (high, high) pairs, then ``prmt`` repacking into k pairs, one scale load per group) took
5.7 (mxfp4) / 5.0 (int4) SASS instructions per decoded value in the w13 K step with the issue slots ~65 % busy:
bound by instruction issue. This one takes 5.1 / 4.2, and the decode steps run 8-20 % faster (DeepSeek-V3 int4
T = 8: 807 -> 657 µs). What is left per k pair (mxfp4): prmt, imad, lop3 and two bf16 multiplies. Folding the
2^126 into the scale (one multiply where 2^(s - 1) is representable: s <= 128, a bound the caller must promise)
took the w13 K step from 663 to 595 SASS instructions but the steps only 1-3 % faster (gpt-oss: slower), so the
loop is not bound by issue alone: not shipped (round 19, docs/kernels.md). ``SERIAL`` (config ``"gluon_rega": 2``)
decodes and multiplies gate, then up, with one fragment live: 111-122 registers instead of 145-156, four programs
per SM instead of three, 2-4 % faster mxfp4 steps (round 19). ``SWORD`` (the launcher's choice for mxfp4 with whole
K steps of four groups and scale rows of whole 4-byte words): a row's step scales load as one u32 and the asm picks
each group's byte, instead of the compiler unpacking four bytes into u32 operands in every step (the integer pipe,
which carries the decode): 672 -> 624 instructions per w13 step, 5-7 % faster steps (round 19).

``EARLY`` (config ``"gluon_early": 1``, round 20): a step's barrier in :func:`_ready` already shows every warp past
step k - 1 (whose wgmmas each warp waited for), so step k refills that slot with step k + STAGES - 1's copies right
there, a whole step before the old place after its own wgmmas and their trailing barrier. The copies get one step
more to land (with 2 slots, one instead of none), and a step keeps two barriers (the compiler puts one between the
refill and the decode's shared loads: it cannot tell the ring slots apart). The same bits. On the H200 (experts step,
old / new alternated twice): DeepSeek-V3 mxfp4 T = 4096 (2 slots) 10161 -> 9340 µs, w13 6046 -> 5113; the two-slot
128-row w13s at T = 16384 and Qwen3's at 4096 9-11 % faster (steps 4-7 %); the decode buckets of DeepSeek-V3 and
Qwen3 2-7 % faster; gpt-oss 1-5 % slower at 64 <= T <= 4096 (DeepSeek-V3 mxfp4 T = 1024 +2 %): so a per-bucket key,
not the default (``benchmarks/results/*-r20-ab-early.log``, ``*-r20-profile-e*.log``).

Each K step waits for its own wgmmas right after issuing them (round 15). A register-operand wgmma reads its A
fragment from registers until a ``wgmma.wait_group`` retires it, but ptxas treats those registers as free once the
wgmma is issued: round 14's loop waited only for step k - 1, and the compiled SASS put step k + 1's loads and decode
straight into the registers step k's wgmmas were still reading (listing the deps in the wait does not help: they
reach ptxas only inside a comment). With 64 token rows (longer wgmmas) that gave wrong rows on the H200; at 16 and 32
the race was there, unseen. The overlap it bought was worth nothing measurable (the step's time is the decode's
issue, and other programs on the SM fill the wgmma's wait): the same µs at every shipped bucket
(``benchmarks/results/*-r15-ab-w4-serial.log``). A CPU test checks the compiled loops for such writes
(``compile_sm90.inflight_fragment_writes``).

Each such wgmma is synchronous (round 42). Triton 3.9 (not 3.6 to 3.8: their compiled loops checked on the CPU)
lowers a separate ``warpgroup_mma_wait`` in a kernel of more than 4 warps with a CTA barrier after it, unless its
barrier analysis finds a barrier or a memory wait next, before any shared-memory access. In the w13 with BN 128 (8
warps, two warpgroups), gate then up, the up's decode reads shared memory right after the gate's wait, so every K
step synchronised the two warpgroups in its middle (one could no longer decode while the other's wgmma ran): under
3.9 Mixtral's mxfp4 w13 at T = 1024 / 4096 took 1544 / 5031 µs, 1364 / 4446 synchronous (the step 7.5 % faster). A
synchronous wgmma lowers to the same wgmma, commit and wait with no barrier, and under 3.6 to the same PTX as
before. The kernels' own barriers already keep a slot from being refilled while a warpgroup's wgmma may still read
it (``_ready`` in the early refill, the barrier before the late one). A CPU test checks the compiled loops for a
barrier between the gate and up wgmmas.

``RELAID`` (round 44; a layer's packed words in :mod:`..w4_layout`'s register-operand layout, which a Triton-backend
layer stores where H and its I are whole 128-value steps): lane q's four words of a row's K step are contiguous and
hold its k pairs with the low codes at nibbles 0-3 and the high codes at 4-7, so a thread makes one 16-byte shared
load per row and places each pair in place (:func:`_frag_relaid`: no gather, no split, no placing ``prmt``; the same
arithmetic after the mask, so the same bits). Per K step (DeepSeek-V3 slice, BLOCK_M 16, BN 64): mxfp4 w13 618 -> 525
SASS instructions, w2 336 -> 293; int4 495 -> 395, 275 -> 227; the steps 3-14 % faster on the H200
(``benchmarks/relaid_probe.py``, docs/kernels.md round 44).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from .._triton.quant import MXFP4
from .w4 import (_PLAIN, _a_layout, _acc_layout, _block_rows, _issue_step, _nvmma, _p_layout, _pack, _token_operand,
                 _w2_store, _w13_store, _w_ptrs, _x_operand)
from .common import pid_to_tile
from .compat import cta_barrier, smem_reinterpret

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
# :data:`.._triton.quant.E2M1_BF16_ASM` (x 2^126, then x the e8m0 scale as bf16): the same value, rounded once
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
# once, as :data:`.._triton.quant.INT4_BF16_ASM`; one lop3 (``(y & 0x000F000F) | 0x43004300``) drops the neighbouring
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


@gluon.jit
def _ready(STAGES: gl.constexpr):
    """Step k's copies have landed for every thread (the fragments read other threads' bytes) and are visible to
    the wgmma."""
    async_copy.wait_group(STAGES - 2)
    cta_barrier()
    fence_async_shared()


@gluon.jit
def _mma_waited(w, xt, acc):
    """``acc + w · xt`` by one wgmma (A ``w`` from registers), waited for before anything else runs: the wgmma
    reads ``w``'s registers until then (module docstring, round 15). A synchronous wgmma, not an asynchronous one
    and its wait: the same PTX under Triton 3.6, and no CTA barrier after the wait under 3.9 (module docstring,
    round 42)."""
    return warpgroup_mma(w, xt, acc)


@gluon.jit
def w4ra_w13_kernel(
    x_ptr, w1_ptr, ws_ptr, b1_ptr, inter_ptr, counts_ptr, row_start_ptr, sorted_ptr,
    H, I, E_local, K, num_pid_m, limit,
    stride_xt, stride_we, stride_wn, stride_wse, stride_wsn, stride_be, stride_ir,
    BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, G: gl.constexpr, QUANT: gl.constexpr,
    GROUP_M: gl.constexpr, BLOCK_E: gl.constexpr, STAGES: gl.constexpr, ACT: gl.constexpr,
    HAS_BIAS: gl.constexpr, HAS_LIMIT: gl.constexpr, EVEN_K: gl.constexpr, num_warps: gl.constexpr,
    SERIAL: gl.constexpr = False, SWORD: gl.constexpr = False, EARLY: gl.constexpr = False,
    RELAID: gl.constexpr = False,
):
    """Grid (num_pid_m · cdiv(I, BN),). Arguments as :func:`.w4.w4_w13_kernel` (swapped: BN weight rows, one
    warpgroup per 64, on the wgmma's M side). ``SERIAL`` (config ``"gluon_rega": 2``; always with BM > 64): gate,
    then up, each fragment's wgmma waited for before the next fragment is decoded (fewer registers). ``EARLY``
    (config ``"gluon_early": 1``): step k refills the ring slot of step k - 1 right after its first barrier instead of
    after its own wgmmas (module docstring)."""
    gl.static_assert(EVEN_K or not RELAID, "re-laid weights are whole 128-value K steps")
    PACK: gl.constexpr = _pack(QUANT)
    P_L: gl.constexpr = _p_layout(QUANT, G, BK, num_warps)
    A_L: gl.constexpr = _a_layout(BK, num_warps)
    ACC_L: gl.constexpr = _acc_layout(BM, BN, True, num_warps)
    NG: gl.constexpr = BK // G
    pid_m, pid_n = pid_to_tile(gl.program_id(0), num_pid_m, gl.cdiv(I, BN), GROUP_M)
    e, first, n_e, ra, valid_a = _block_rows(pid_m, counts_ptr, row_start_ptr, E_local, BM, BLOCK_E, A_L, num_warps)
    if e < E_local:
        x_ptrs, x_mask, offs_v = _token_operand(x_ptr, sorted_ptr, pid_m, ra, valid_a, K, stride_xt, BM, BK, A_L)
        KP = H // PACK
        NKG = H // G
        g_ptrs, w_mask, vid = _w_ptrs(w1_ptr + e.to(gl.int64) * stride_we, pid_n * BN, I, stride_wn, NG, G // PACK,
                                      32 // PACK, P_L, BN)
        u_ptrs = g_ptrs + I.to(gl.int64) * stride_wn
        ws_g = ws_ptr + e.to(gl.int64) * stride_wse
        ws_u = ws_g + I.to(gl.int64) * stride_wsn
        x_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BM, BK], _nvmma(BM, BK))
        p_smem = gl.allocate_shared_memory(w1_ptr.dtype.element_ty, [2 * STAGES, BN, NG, G // PACK], _PLAIN)
        nk = gl.cdiv(H, BK)
        for st in gl.static_range(STAGES - 1):
            _issue_step(x_smem, p_smem, x_ptrs, x_mask, offs_v, H, g_ptrs, u_ptrs, w_mask, vid, KP, st, nk, STAGES, BK,
                        PACK, EVEN_K, 2)
        n0 = pid_n * BN
        sg0 = _frag_scales(ws_g, n0, I, stride_wsn, 0, NKG, BN, BK, G, EVEN_K, num_warps, SWORD)  # two K steps ahead
        su0 = _frag_scales(ws_u, n0, I, stride_wsn, 0, NKG, BN, BK, G, EVEN_K, num_warps, SWORD)
        sg1 = _frag_scales(ws_g, n0, I, stride_wsn, 1, NKG, BN, BK, G, EVEN_K, num_warps, SWORD)
        su1 = _frag_scales(ws_u, n0, I, stride_wsn, 1, NKG, BN, BK, G, EVEN_K, num_warps, SWORD)
        acc_g = gl.zeros([BN, BM], gl.float32, layout=ACC_L)
        acc_u = gl.zeros_like(acc_g)
        for k in range(nk):
            sg2 = _frag_scales(ws_g, n0, I, stride_wsn, k + 2, NKG, BN, BK, G, EVEN_K, num_warps, SWORD)
            su2 = _frag_scales(ws_u, n0, I, stride_wsn, k + 2, NKG, BN, BK, G, EVEN_K, num_warps, SWORD)
            _ready(STAGES)
            if EARLY:
                _issue_step(x_smem, p_smem, x_ptrs, x_mask, offs_v, H, g_ptrs, u_ptrs, w_mask, vid, KP, k + STAGES - 1,
                            nk, STAGES, BK, PACK, EVEN_K, 2)
            slot = k % STAGES
            xt = x_smem.index(slot).permute((1, 0))
            # wait for step k's own wgmmas before anything else runs: they read the A fragments from registers
            # while in flight, and ptxas may give any later value (the next step's loads and decode) the registers
            # of a fragment it considers dead once the wgmma is issued (module docstring, round 15)
            if BM > 64 or SERIAL:  # gate, then up: one fragment's registers at a time (beside two [BN, BM > 64]
                # accumulators; SERIAL: fewer registers, more programs per SM)
                acc_g = _mma_waited(_frag(p_smem.index(2 * slot), sg0, QUANT, BN, BK, G, ACC_L, num_warps, SWORD,
                                          RELAID), xt, acc_g)
                acc_u = _mma_waited(_frag(p_smem.index(2 * slot + 1), su0, QUANT, BN, BK, G, ACC_L, num_warps, SWORD,
                                          RELAID), xt, acc_u)
            else:
                wg = _frag(p_smem.index(2 * slot), sg0, QUANT, BN, BK, G, ACC_L, num_warps, SWORD, RELAID)
                wu = _frag(p_smem.index(2 * slot + 1), su0, QUANT, BN, BK, G, ACC_L, num_warps, SWORD, RELAID)
                acc_g = warpgroup_mma(wg, xt, acc_g, is_async=True)
                acc_u = warpgroup_mma(wu, xt, acc_u, is_async=True)
                acc_g, acc_u = warpgroup_mma_wait(num_outstanding=0, deps=(acc_g, acc_u))
            if not EARLY:
                cta_barrier()  # ... in every warp: its slot may be refilled
                _issue_step(x_smem, p_smem, x_ptrs, x_mask, offs_v, H, g_ptrs, u_ptrs, w_mask, vid, KP,
                            k + STAGES - 1, nk, STAGES, BK, PACK, EVEN_K, 2)
            sg0, su0, sg1, su1 = sg1, su1, sg2, su2
        acc_g, acc_u = warpgroup_mma_wait(num_outstanding=0, deps=(acc_g, acc_u))
        async_copy.wait_group(0)

        _w13_store(acc_g, acc_u, e, pid_m, pid_n, first, n_e, b1_ptr, inter_ptr, I, stride_be, stride_ir, limit, BM,
                   BN, True, ACC_L, ACT, HAS_BIAS, HAS_LIMIT)


@gluon.jit
def w4ra_w2_sum_kernel(
    inter_ptr, w2_ptr, ws_ptr, b2_ptr, tw_ptr, counts_ptr, row_start_ptr, sorted_ptr, part_ptr,
    H, I, E_local, K, num_pid_m, NBN,
    stride_ir, stride_we, stride_wn, stride_wse, stride_wsn, stride_be, stride_twt, stride_pr,
    BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, G: gl.constexpr, QUANT: gl.constexpr,
    GROUP_M: gl.constexpr, BLOCK_E: gl.constexpr, STAGES: gl.constexpr, HAS_BIAS: gl.constexpr,
    ON_INPUT: gl.constexpr, EVEN_K: gl.constexpr, num_warps: gl.constexpr, SWORD: gl.constexpr = False,
    EARLY: gl.constexpr = False, RELAID: gl.constexpr = False,
):
    """Grid (num_pid_m · NBN,). Arguments as :func:`.w4.w4_w2_sum_kernel` (swapped); ``SWORD``, ``EARLY`` as the
    w13's."""
    gl.static_assert(EVEN_K or not RELAID, "re-laid weights are whole 128-value K steps")
    PACK: gl.constexpr = _pack(QUANT)
    P_L: gl.constexpr = _p_layout(QUANT, G, BK, num_warps)
    A_L: gl.constexpr = _a_layout(BK, num_warps)
    ACC_L: gl.constexpr = _acc_layout(BM, BN, True, num_warps)
    NG: gl.constexpr = BK // G
    pid_m, pid_n = pid_to_tile(gl.program_id(0), num_pid_m, NBN, GROUP_M)
    e, first, n_e, ra, valid_a = _block_rows(pid_m, counts_ptr, row_start_ptr, E_local, BM, BLOCK_E, A_L, num_warps)
    if e < E_local:
        x_ptrs, x_mask, offs_v = _x_operand(inter_ptr, pid_m * BM + ra, valid_a, stride_ir, BK, A_L)
        KP = I // PACK
        NKG = I // G
        w_ptrs, w_mask, vid = _w_ptrs(w2_ptr + e.to(gl.int64) * stride_we, pid_n * BN, H, stride_wn, NG, G // PACK,
                                      32 // PACK, P_L, BN)
        ws_e = ws_ptr + e.to(gl.int64) * stride_wse
        x_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BM, BK], _nvmma(BM, BK))
        p_smem = gl.allocate_shared_memory(w2_ptr.dtype.element_ty, [STAGES, BN, NG, G // PACK], _PLAIN)
        nk = gl.cdiv(I, BK)
        for st in gl.static_range(STAGES - 1):
            _issue_step(x_smem, p_smem, x_ptrs, x_mask, offs_v, I, w_ptrs, w_ptrs, w_mask, vid, KP, st, nk, STAGES, BK,
                        PACK, EVEN_K, 1)
        n0 = pid_n * BN
        s0 = _frag_scales(ws_e, n0, H, stride_wsn, 0, NKG, BN, BK, G, EVEN_K, num_warps, SWORD)
        s1 = _frag_scales(ws_e, n0, H, stride_wsn, 1, NKG, BN, BK, G, EVEN_K, num_warps, SWORD)
        acc = gl.zeros([BN, BM], gl.float32, layout=ACC_L)
        for k in range(nk):
            s2 = _frag_scales(ws_e, n0, H, stride_wsn, k + 2, NKG, BN, BK, G, EVEN_K, num_warps, SWORD)
            _ready(STAGES)
            if EARLY:
                _issue_step(x_smem, p_smem, x_ptrs, x_mask, offs_v, I, w_ptrs, w_ptrs, w_mask, vid, KP, k + STAGES - 1,
                            nk, STAGES, BK, PACK, EVEN_K, 1)
            slot = k % STAGES
            w = _frag(p_smem.index(slot), s0, QUANT, BN, BK, G, ACC_L, num_warps, SWORD, RELAID)
            acc = _mma_waited(w, x_smem.index(slot).permute((1, 0)), acc)
            if not EARLY:
                cta_barrier()
                _issue_step(x_smem, p_smem, x_ptrs, x_mask, offs_v, I, w_ptrs, w_ptrs, w_mask, vid, KP, k + STAGES - 1,
                            nk, STAGES, BK, PACK, EVEN_K, 1)
            s0, s1 = s1, s2
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        async_copy.wait_group(0)

        _w2_store(acc, e, pid_m, pid_n, first, n_e, b2_ptr, tw_ptr, sorted_ptr, part_ptr, H, K, stride_be, stride_twt,
                  stride_pr, BM, BN, True, ACC_L, HAS_BIAS, ON_INPUT)

