"""The register-operand packed layout (:mod:`moekit.ops.w4_layout`): the re-layout is a bijection on whole
128-value chunks and a last half chunk, puts each quad lane's k pairs where the re-laid decode reads them (a half
chunk where the kernels' tail copy finds them), and refuses what it cannot re-lay. The decode's asm on these words: ``test_w4_rega_asm.py``; the kernels: ``test_w4_relaid.py``."""

import pytest
import torch

from moekit.ops import w4_layout
from moekit.ops.w4_layout import CHUNK, relaid_ok, relay_rega, unrelay_rega


@pytest.mark.parametrize("shape, dtype", [((3, 5, 64), torch.uint8),  # mxfp4 [E, N, K/2], one chunk per row
                                          ((2, 7, 448), torch.uint8),  # seven chunks (DeepSeek-V3's H = 7168 / 16)
                                          ((4, 3, 96), torch.int32),  # int4 [E, N, K/8], six chunks
                                          ((16,), torch.int32)])  # one bare row of int4 words
def test_relay_round_trips(monkeypatch, shape, dtype):
    monkeypatch.setattr(w4_layout, "_SLICE_ROWS", 4)  # rows re-laid four at a time: slices end mid-tensor
    g = torch.Generator().manual_seed(0)
    w = torch.randint(0, 256, shape if dtype == torch.uint8 else (*shape[:-1], shape[-1] * 4), generator=g,
                      dtype=torch.int64).to(torch.uint8)
    w = w.view(dtype).reshape(shape)
    r = relay_rega(w)
    assert r.shape == w.shape and r.dtype == w.dtype
    assert not torch.equal(r, w)  # random bytes: re-laid means moved
    assert torch.equal(unrelay_rega(r), w)
    assert torch.equal(relay_rega(unrelay_rega(w)), w)


def test_each_lane_word_holds_its_pairs_low_codes_then_high_codes():
    # chunk byte b = pair b (codes of k = 2b, 2b + 1); lane q's word j holds pairs q + 4 (4 j + jj): low codes at
    # nibbles 0-3, high codes at nibbles 4-7; the second chunk of a row is laid out the same, on its own bytes
    w = torch.randint(0, 256, (2, 128), generator=torch.Generator().manual_seed(1), dtype=torch.int64).to(torch.uint8)
    words = relay_rega(w).view(torch.int32)
    for row in range(2):
        for chunk in range(2):
            spec = w[row, 64 * chunk:64 * (chunk + 1)].tolist()
            for q in range(4):
                for j in range(4):
                    word = int(words[row, 16 * chunk + 4 * q + j]) & 0xFFFFFFFF
                    for jj in range(4):
                        byte = spec[q + 4 * (4 * j + jj)]
                        assert (word >> (4 * jj)) & 0xF == byte & 0xF
                        assert (word >> (16 + 4 * jj)) & 0xF == byte >> 4


@pytest.mark.parametrize("nbytes", [32, 96, 1440])  # one half chunk; one and a half; gpt-oss's 2880 values
def test_a_half_chunk_holds_each_lanes_first_two_words(nbytes):
    # rows of 128 n + 64 values: the whole chunks as above; the half chunk holds, as word 2q + j, the word 4q + j
    # (j < 2: pairs 0-31) of the whole chunk the row would end in if padded with zero pairs, which is where the
    # kernels' tail copy (half_tail_src) puts it back; the round trip holds
    g = torch.Generator().manual_seed(2)
    w = torch.randint(0, 256, (3, nbytes), generator=g, dtype=torch.int64).to(torch.uint8)
    r = relay_rega(w)
    assert r.shape == w.shape and torch.equal(unrelay_rega(r), w)
    padded = torch.cat([w, torch.zeros(3, 32, dtype=torch.uint8)], dim=1)
    whole = relay_rega(padded)
    assert torch.equal(r[:, :-32], whole[:, :nbytes - 32])
    half, last = r[:, -32:].view(torch.int32), whole[:, -64:].view(torch.int32)
    for q in range(4):
        for j in range(2):
            assert torch.equal(half[:, 2 * q + j], last[:, 4 * q + j])
        assert not last[:, 4 * q + 2:4 * q + 4].any()  # pairs 32-63: the zero padding
    for vec, elems in ((16, r[:, -32:]), (4, r[:, -32:].view(torch.int32))):  # mxfp4 bytes, int4 words
        src = [w4_layout.half_tail_src(e, vec) for e in range(4 * vec)]
        assert sorted(s for s in src if s >= 0) == list(range(2 * vec))  # each half-chunk element read once
        spread = torch.stack([elems[:, s] if s >= 0 else torch.zeros_like(elems[:, 0]) for s in src], dim=1)
        assert torch.equal(spread.view(torch.uint8), whole[:, -64:])


def test_relay_refuses_what_it_cannot_re_lay():
    assert relaid_ok(CHUNK) and relaid_ok(7168) and relaid_ok(2880) and relaid_ok(64)
    assert not relaid_ok(1440) and not relaid_ok(96) and not relaid_ok(0)
    with pytest.raises(ValueError, match="rows hold 1440 values; the register-operand layout needs a multiple of 64"):
        relay_rega(torch.zeros(2, 720, dtype=torch.uint8))  # gpt-oss's I on two tensor-parallel ranks
    with pytest.raises(TypeError, match="must be packed 4-bit weights .* got dtype torch.bfloat16"):
        relay_rega(torch.zeros(2, 64, dtype=torch.bfloat16))
