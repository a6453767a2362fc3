"""The register-operand 4-bit decode's PTX (:mod:`moekit.ops._gluon.w4_frag`, the A fragments of
:mod:`moekit.ops._gluon.w4_rega`) run on CPU by a small emulator of the instructions it uses, against the formats'
reference values: every byte a k pair, every quad lane q, scales across their range. The GPU tests compare the compiled kernels with the Triton ones; this checks the asm's selectors and
arithmetic where no GPU is (CI), so an edit to the strings that breaks a pair or a rounding fails here first.
"""

import re

import pytest
import torch

gluon = pytest.importorskip("triton.experimental.gluon")

from moekit.ops._gluon import w4_frag  # noqa: E402 - the register-operand GEMMs' decode

M32 = 0xFFFFFFFF
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _bf16_bits(x: float) -> int:
    """x (exactly representable in float64) rounded once to bf16 (nearest, ties to even): its 16 bits."""
    return int(torch.tensor([x], dtype=torch.float64).to(torch.float32).to(torch.bfloat16).view(torch.int16)) & 0xFFFF


def _bf16(bits: int) -> float:
    return float(torch.tensor([bits & 0xFFFF], dtype=torch.int32).to(torch.int16).view(torch.bfloat16).double())


def _bf16x2(a: int, b: int, op) -> int:
    """One packed-bf16 instruction: each half computed exactly (float64), then rounded once to bf16."""
    lo = _bf16_bits(op(_bf16(a), _bf16(b)))
    hi = _bf16_bits(op(_bf16(a >> 16), _bf16(b >> 16)))
    return lo | hi << 16


def _prmt(a: int, b: int, sel: int) -> int:
    src = (a & M32) | (b & M32) << 32
    out = 0
    for i in range(4):
        nib = (sel >> (4 * i)) & 0xF
        byte = (src >> (8 * (nib & 7))) & 0xFF
        if nib & 8:  # sign-replicate mode: the selected byte's top bit, in all eight
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for bit in range(32):
        idx = ((a >> bit) & 1) << 2 | ((b >> bit) & 1) << 1 | ((c >> bit) & 1)
        out |= ((lut >> idx) & 1) << bit
    return out


def run_asm(asm: str, operands: dict[int, int]) -> dict[int, int]:
    """Execute the asm block on ``operands`` ({n: u32} for ``$n``); returns every ``$n`` written."""
    regs: dict[str, int] = {f"${n}": v & M32 for n, v in operands.items()}

    def val(tok: str) -> int:
        tok = tok.strip()
        return regs[tok] if tok in regs else int(tok, 0) & M32

    for line in asm.replace("{", "\n").replace("}", "\n").split("\n"):
        line = line.strip().rstrip(";")
        if not line or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        args = [a.strip() for a in rest.split(",")]
        d, xs = args[0], [val(a) for a in args[1:]]
        if op == "prmt.b32":
            r = _prmt(*xs)
        elif op == "and.b32":
            r = xs[0] & xs[1]
        elif op == "or.b32":
            r = xs[0] | xs[1]
        elif op == "shr.u32":
            r = xs[0] >> xs[1]
        elif op == "mov.b32":
            r = xs[0]
        elif op == "mul.lo.u32":
            r = (xs[0] * xs[1]) & M32
        elif op == "mul.hi.u32":
            r = (xs[0] * xs[1]) >> 32
        elif op == "lop3.b32":
            r = _lop3(*xs)
        elif op == "max.u16x2":
            r = max(xs[0] & 0xFFFF, xs[1] & 0xFFFF) | max(xs[0] >> 16, xs[1] >> 16) << 16
        elif op == "mul.rn.bf16x2":
            r = _bf16x2(xs[0], xs[1], lambda p, q: p * q)
        elif op == "sub.rn.bf16x2":
            r = _bf16x2(xs[0], xs[1], lambda p, q: p - q)
        else:
            raise AssertionError(f"the emulator does not know {op!r} (line {line!r})")
        regs[d] = r & M32
    return {int(k[1:]): v for k, v in regs.items() if re.fullmatch(r"\$\d+", k)}


def _call(asm: str, words: list[int], q: int, scale_regs: list[int], group_sel: int | None = None) -> list[int]:
    """One call of a pairs asm (pack 8): the 4 words twice each (the pair dim), 8 selectors, then the scales (and,
    for the scale-word asm, 8 copies of the group selector)."""
    ops = {}
    for j, w in enumerate(words):
        ops[4 + 2 * j] = ops[5 + 2 * j] = w
    for n in range(12, 20):
        ops[n] = q | (q + 4) << 4
    for n, s in enumerate(scale_regs):
        ops[20 + n] = s
    if group_sel is not None:
        for n in range(28, 36):
            ops[n] = group_sel
    out = run_asm(asm, ops)
    return [out[j] for j in range(4)]


def _check_pairs(asm: str, scale_regs: list[int], value, seed: int) -> None:
    """Every quad lane q of 6 word sets (the first holds every code in every position): output j must be byte q of
    word j decoded, low nibble (even k) in the low half, each ``value(nibble)`` rounded once to bf16."""
    g = torch.Generator().manual_seed(seed)
    for trial in range(6):
        words = [int(x) for x in torch.randint(0, 2**32, (4,), generator=g, dtype=torch.int64)]
        if trial == 0:
            words = [0x76543210, 0xFEDCBA98, 0x0F1E2D3C, 0x8899AABB]
        for q in range(4):
            out = _call(asm, words, q, scale_regs)
            for j in range(4):
                byte = (words[j] >> (8 * q)) & 0xFF
                want = _bf16_bits(value(byte & 0xF)) | _bf16_bits(value(byte >> 4)) << 16
                assert out[j] == want, (hex(words[j]), q, j, hex(out[j]), hex(want))


@pytest.mark.parametrize("s", [0, 1, 100, 120, 127, 128, 130, 200, 254])  # e8m0: 0 (2^-127, subnormal) ... 2^127
def test_mxfp4_pairs_asm_decodes_every_byte_as_the_reference(s):
    def value(code: int) -> float:
        return (-1.0 if code & 8 else 1.0) * E2M1[code & 7] * 2.0 ** (s - 127)

    _check_pairs(w4_frag._E2M1_PAIRS.value, [s] * 8, value, seed=s)


@pytest.mark.parametrize("seed", range(4))
def test_mxfp4_pairs_asm_with_the_scale_word_picks_each_groups_byte(seed):
    # ``SWORD``: the row's four e8m0 bytes arrive as one u32 and the group selector j | 4 << 4 | j << 8 | 4 << 12 picks
    # byte j inside the asm: the same outputs as the byte-per-call asm given that byte, for every group and quad lane
    # (scale bytes 0 and 254 among them)
    g = torch.Generator().manual_seed(seed)
    words = [int(x) for x in torch.randint(0, 2**32, (4,), generator=g, dtype=torch.int64)]
    scales = [int(x) for x in torch.randint(0, 255, (4,), generator=g)]
    scales[seed % 4] = (0, 254, 127, 1)[seed]
    word = sum(b << (8 * i) for i, b in enumerate(scales))
    for j in range(4):
        for q in range(4):
            sel = j * w4_frag._GSEL_MUL.value + w4_frag._GSEL_ADD.value  # the kernel's selector of group j
            got = _call(w4_frag._E2M1_PAIRS_W.value, words, q, [word] * 8, group_sel=sel)
            assert got == _call(w4_frag._E2M1_PAIRS.value, words, q, [scales[j]] * 8), (seed, j, q)


@pytest.mark.parametrize("scale", [1.0, 0.0123, -0.5, 3.0e-3, 7.25, 1.0e-30])
def test_int4_pairs_asm_decodes_every_byte_as_the_reference(scale):
    sb = _bf16_bits(scale)
    pair = sb | sb << 16
    _check_pairs(w4_frag._INT4_PAIRS.value, [pair] * 4, lambda u: (u - 8) * _bf16(sb), seed=7)  # offset binary


def test_the_emulator_catches_a_wrong_selector():
    # the test above is not vacuous: a pair selector that takes the neighbouring byte's codes decodes wrong values
    bad = w4_frag._E2M1_PAIRS.value.replace(w4_frag._pair_sel(1, True), w4_frag._pair_sel(2, True), 1)
    words = [0x76543210, 0xFEDCBA98, 0x0F1E2D3C, 0x8899AABB]
    assert _call(bad, words, 0, [127] * 8) != _call(w4_frag._E2M1_PAIRS.value, words, 0, [127] * 8)


# ``RELAID``: weights in the register-operand layout (moekit.ops.w4_layout), one call per (row, lane word)

def _relaid_call(asm: str, word: int, scale_regs: list[int], nscale: int, group_sel: int | None = None) -> list[int]:
    """One call of a re-laid asm (pack 8): the lane's word eight times, then ``nscale`` scale registers (and, for the
    scale-word asm, 8 copies of the group selector)."""
    ops = {n: word for n in range(4, 12)}
    for n, s in enumerate(scale_regs[:nscale]):
        ops[12 + n] = s
    if group_sel is not None:
        for n in range(12 + nscale, 20 + nscale):
            ops[n] = group_sel
    out = run_asm(asm, ops)
    return [out[j] for j in range(4)]


def _check_relaid(asm: str, scale_regs: list[int], nscale: int, value, seed: int, group_sel=None) -> None:
    """Chunks of SPEC-packed bytes (the first holds every byte value in order) re-laid by ``relay_rega``: for every
    lane q and word j, output jj must be pair ``q + 4 (4 j + jj)`` of the chunk decoded, low code (even k) in the
    low half, each ``value(code)`` rounded once to bf16: the fragment :func:`w4_frag._frag_spec` builds."""
    from moekit.ops.w4_layout import relay_rega

    g = torch.Generator().manual_seed(seed)
    chunks = [torch.arange(64, dtype=torch.uint8) * 4 + 1] + [
        torch.randint(0, 256, (64,), generator=g, dtype=torch.int64).to(torch.uint8) for _ in range(3)]
    for spec in chunks:
        re_laid = relay_rega(spec).view(torch.int32).tolist()
        for q in range(4):
            for j in range(4):
                out = _relaid_call(asm, re_laid[4 * q + j] & M32, scale_regs, nscale, group_sel)
                for jj in range(4):
                    byte = int(spec[q + 4 * (4 * j + jj)])
                    want = _bf16_bits(value(byte & 0xF)) | _bf16_bits(value(byte >> 4)) << 16
                    assert out[jj] == want, (q, j, jj, hex(byte), hex(out[jj]), hex(want))


@pytest.mark.parametrize("s", [0, 1, 120, 127, 128, 200, 254])  # e8m0: 0 (2^-127, subnormal) ... 2^127
def test_relaid_mxfp4_asm_decodes_every_pair_as_the_reference(s):
    def value(code: int) -> float:
        return (-1.0 if code & 8 else 1.0) * E2M1[code & 7] * 2.0 ** (s - 127)

    _check_relaid(w4_frag._E2M1_RELAID.value, [s] * 8, 8, value, seed=s)


@pytest.mark.parametrize("seed", range(4))
def test_relaid_mxfp4_asm_with_the_scale_word_picks_each_groups_byte(seed):
    # ``SWORD`` with the re-laid words: group j's byte of the row's scale word, picked inside the asm, decodes as the
    # byte-per-call asm given that byte
    g = torch.Generator().manual_seed(seed)
    scales = [int(x) for x in torch.randint(0, 255, (4,), generator=g)]
    scales[seed % 4] = (0, 254, 127, 1)[seed]
    word = sum(b << (8 * i) for i, b in enumerate(scales))
    for j in range(4):
        sel = j * w4_frag._GSEL_MUL.value + w4_frag._GSEL_ADD.value
        for lane_word in (0x76543210, 0xFEDCBA98, int(torch.randint(0, 2**32, (1,), generator=g, dtype=torch.int64))):
            got = _relaid_call(w4_frag._E2M1_RELAID_W.value, lane_word, [word] * 8, 8, group_sel=sel)
            assert got == _relaid_call(w4_frag._E2M1_RELAID.value, lane_word, [scales[j]] * 8, 8), (seed, j)


@pytest.mark.parametrize("scale", [1.0, -0.5, 3.0e-3, 7.25, 1.0e-30])
def test_relaid_int4_asm_decodes_every_pair_as_the_reference(scale):
    sb = _bf16_bits(scale)
    _check_relaid(w4_frag._INT4_RELAID.value, [sb | sb << 16] * 4, 4, lambda u: (u - 8) * _bf16(sb), seed=11)


def test_the_relaid_check_catches_a_wrong_mask():
    # not vacuous: pair 1 masked at pair 0's nibbles decodes other codes
    bad = w4_frag._E2M1_RELAID.value.replace("and.b32 y, $4, 0x00F000F0", "and.b32 y, $4, 0x000F000F", 1)
    assert bad != w4_frag._E2M1_RELAID.value
    with pytest.raises(AssertionError):
        _check_relaid(bad, [127] * 8, 8, lambda c: (-1.0 if c & 8 else 1.0) * E2M1[c & 7], seed=0)
