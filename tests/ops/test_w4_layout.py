"""The register-operand packed layout (:mod:`moekit.ops.w4_layout`): the re-layout is a bijection on whole
128-value chunks, puts each quad lane's k pairs where the re-laid decode reads them, and refuses what it cannot
re-lay. The decode's asm on these words: ``test_w4_rega_asm.py``; the kernels: ``test_w4_relaid.py``."""

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


def test_relay_refuses_what_it_cannot_re_lay():
    assert relaid_ok(CHUNK) and relaid_ok(7168) and not relaid_ok(2880) and not relaid_ok(0)
    with pytest.raises(ValueError, match="rows hold 2880 values; the register-operand layout needs a multiple of 128"):
        relay_rega(torch.zeros(2, 1440, dtype=torch.uint8))  # gpt-oss's H: 22.5 chunks
    with pytest.raises(TypeError, match="must be packed 4-bit weights .* got dtype torch.bfloat16"):
        relay_rega(torch.zeros(2, 64, dtype=torch.bfloat16))
