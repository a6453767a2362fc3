"""The register-operand packed layout of 4-bit weights: SPEC §8's bytes re-laid so that each thread of the
register-operand GEMMs (:mod:`._gluon.w4_rega`, ``RELAID``) loads exactly its own codes, already in place.

SPEC §8 packs a row's k pairs one per byte (mxfp4: byte ``b`` holds the codes of k = 2b (low nibble) and
2b + 1 (high); int4's little-endian int32 words hold the same bytes). The wgmma A fragment (bf16, k width 2) gives
quad lane ``q`` of a row the k pairs ``q, q + 4, q + 8, ...``: byte ``q`` of every 4-byte word. The SPEC layout makes
each thread read all of a row's words (shared with its quad) and gather and split its bytes before it can place a
pair (round 19: 3 ``prmt`` + 3 integer ops per 8 codes, on the integer pipe that carries the decode).

Re-laid, per row and chunk of 128 k values (64 bytes, 16 words): chunk byte ``b`` (pair b), with ``q = b % 4``,
``i = b // 4``, goes to word ``4q + i // 4``, its low code at nibble ``i % 4`` and its high code at nibble
``4 + i % 4``::

    word 4q + j  (j = 0..3) = [lo(p0) lo(p1) lo(p2) lo(p3) | hi(p0) hi(p1) hi(p2) hi(p3)]   (nibble 0 = bits 0-3)
    with p_jj = pair q + 4 (4j + jj)

so lane q's four words are contiguous (one 16-byte load per row and K step of 128), and pair ``jj``'s two codes sit
16 bits apart, where one mask (and, for jj = 1 / 3 of mxfp4, another multiplier) places them. A chunk holds whole
scale groups (32 or 128 values), so the group of every code is unchanged.

A row of ``128 n + 64`` values (gpt-oss's 2880) ends in a half chunk (32 bytes, 8 words): its words are the full
layout's words ``4q + j`` for ``j < 2`` (pairs 0-31) packed as word ``2q + j``, so lane q's two words are contiguous;
the kernels copy them to where a whole chunk has them (:func:`half_tail_src`) and read that step as any other, the
missing pairs zero. Rows of other lengths are not re-laid (:func:`relaid_ok`).

    w: [..., K / PACK] uint8 (mxfp4) or int32 (int4)  ->  the same shape and dtype, re-laid
"""

from __future__ import annotations

import torch

__all__ = ["CHUNK", "LAYER_HALF_CHUNKS", "half_tail_src", "packed_layout_for", "relaid_ok", "rega_layout_ok",
           "relay_quantized", "relay_rega", "unrelay_rega"]

#: k values per re-laid chunk: one 128-wide K step of the register-operand GEMMs
CHUNK = 128


def relaid_ok(k: int, half_chunks: bool = True) -> bool:
    """Whether rows of ``k`` values can be re-laid: whole chunks, or (``half_chunks``) whole chunks and one half
    chunk."""
    return k > 0 and k % (CHUNK // 2 if half_chunks else CHUNK) == 0


def half_tail_src(e: int, vec: int) -> int:
    """Where a half chunk holds the word element that a whole chunk holds at element ``e`` (elements of ``vec`` per
    16-byte lane group: 16 bytes of mxfp4, 4 int32 words of int4), or -1 if the half chunk has none (pairs 32-63):
    lane ``q = e // vec`` keeps its first ``vec / 2`` elements, at ``q · vec / 2``. The kernels' tail copy
    (``_gluon.w4_ring._half_tail``, ``_triton.w4_decode.load_packed_w``) computes the same."""
    q, r = divmod(e, vec)
    return q * (vec // 2) + r if r < vec // 2 else -1


#: Whether layers store rows that end in a half chunk (gpt-oss's 2880) re-laid. The kernels read such words with the
#: same bits (round 45's layout; on the H200 in round 46: 55 GPU bit tests, and the probe's outputs bit-identical at
#: every point), but a layer stores one layout for every token bucket, and on gpt-oss the re-laid words are faster
#: only at T = 8-256 (register-operand GEMMs, -7 to -10 %) and slower at T = 1 (the Triton GEMMs, 57.6 -> 76.1 µs)
#: and T >= 1024 (the w2, 460 -> 598 µs at T = 1024): layers keep such rows in SPEC §8's packing (docs/kernels.md,
#: round 46). Round 47 (CPU only): that w2 needs 130 / 141 registers re-laid (one 8-warp program per SM instead of
#: two); config ``"gluon_maxnreg": 128`` fits it in 128 with no spill. Round 49 on the H200 (``r47-a``, experts step
#: in a CUDA graph, alternated twice): with the best variant per bucket the re-laid words win at T = 1 (mxfp4 57.0 ->
#: 54.4 µs, int4 58.5 -> 53.2), T = 1024 (1332 -> 1260, 1412 -> 1322: the w2 in 128 registers) and T = 4096 (3328 ->
#: 3160, 3407 -> 3240) but lose at T = 8192 (5273 -> 6635, 5530 -> 5982: the large buckets' early-issue w13 and Triton
#: w2 read them slower, and the register-operand w2 there is 9100). Decision: layers keep SPEC packing (5-9 % off the
#: buckets up to 4096 is not worth 8-26 % on every prefill of 8192 tokens and more); the way on is a large-T GEMM that
#: reads re-laid words at the SPEC words' speed.
LAYER_HALF_CHUNKS = False


def rega_layout_ok(fmt, params_dtype: torch.dtype, hidden: int, inter_local: int, half_chunks: bool = False) -> bool:
    """Whether packed words of this format, activation dtype and (rank-local) sizes can be stored re-laid for the
    register-operand kernels: mxfp4 or int4, 16-bit activations (float32 ones run K steps of 64), and both GEMMs' K
    (``H`` for w13, the local ``I`` for w2) whole 128-value chunks, or (``half_chunks``) those and one half chunk."""
    return (getattr(fmt, "name", None) in ("mxfp4", "int4_group") and params_dtype in (torch.bfloat16, torch.float16)
            and relaid_ok(hidden, half_chunks) and relaid_ok(inter_local, half_chunks))


def packed_layout_for(packed_layouts, fmt, params_dtype: torch.dtype, hidden: int, inter_local: int) -> str:
    """The layout a layer stores its packed words in: ``"rega"`` where its kernel table reads it (``packed_layouts``,
    the table's ``Kernels.packed_layouts``) and :func:`rega_layout_ok` holds (half chunks: :data:`LAYER_HALF_CHUNKS`),
    else ``"spec"`` (SPEC §8's packing)."""
    ok = "rega" in packed_layouts and rega_layout_ok(fmt, params_dtype, hidden, inter_local, LAYER_HALF_CHUNKS)
    return "rega" if ok else "spec"


def _bytes(w: torch.Tensor, arg: str) -> torch.Tensor:
    if w.dtype not in (torch.uint8, torch.int32):
        raise TypeError(f"{arg} must be packed 4-bit weights (uint8 mxfp4 or int32 int4), got dtype {w.dtype}")
    b = w.contiguous().view(torch.uint8)
    if b.shape[-1] % (CHUNK // 4):
        k = b.shape[-1] * 2
        raise ValueError(f"{arg} rows hold {k} values; the register-operand layout needs a multiple of {CHUNK // 2} "
                         f"(whole {CHUNK}-value chunks, the last may be half)")
    return b


#: leading rows re-laid per slice (bounded scratch on a whole layer's experts: a few int tensors of this many rows)
_SLICE_ROWS = 4096


def _per_slice(w: torch.Tensor, fn) -> torch.Tensor:
    """``fn`` over [rows, K/2] byte slices of ``w``'s rows (a new tensor of ``w``'s shape and dtype)."""
    b = _bytes(w, "w")
    flat = b.reshape(-1, b.shape[-1])
    out = torch.empty_like(flat)
    for r in range(0, flat.shape[0], _SLICE_ROWS):
        out[r:r + _SLICE_ROWS] = fn(flat[r:r + _SLICE_ROWS])
    return out.reshape(b.shape).view(w.dtype).reshape(w.shape)


def _relay_whole(b: torch.Tensor) -> torch.Tensor:
    rows, n = b.shape[0], b.shape[1] // (CHUNK // 2)
    c = b.reshape(rows, n, 4, 4, 4)  # chunk byte 16 j + 4 jj + q -> [j, jj, q]
    lo, hi = (c & 0xF).permute(0, 1, 4, 2, 3), (c >> 4).permute(0, 1, 4, 2, 3)  # [rows, n, q, j, jj]
    nib = torch.cat([lo, hi], dim=-1)  # [rows, n, q, j, 8]: nibble jj = lo(p_jj), 4 + jj = hi(p_jj)
    return (nib[..., 0::2] | nib[..., 1::2] << 4).reshape(rows, -1)  # two nibbles per byte, low first


def _unrelay_whole(b: torch.Tensor) -> torch.Tensor:
    rows, n = b.shape[0], b.shape[1] // (CHUNK // 2)
    c = b.reshape(rows, n, 4, 4, 4)  # [q, j, byte of the word]
    nib = torch.stack([c & 0xF, c >> 4], dim=-1).reshape(rows, n, 4, 4, 8)  # [q, j, nibble]
    pairs = nib[..., :4] | nib[..., 4:] << 4  # [q, j, jj]
    return pairs.permute(0, 1, 3, 4, 2).reshape(rows, -1)  # [j, jj, q]: chunk byte 16 j + 4 jj + q


def _lane_halves(chunk: torch.Tensor) -> torch.Tensor:
    """A whole chunk's [rows, 64] bytes as [rows, q, 2, 8]: lane q's words j < 2 at ``[:, q, 0]``."""
    return chunk.view(chunk.shape[0], 4, 2, 8)


def _relay(b: torch.Tensor) -> torch.Tensor:
    rows, nb = b.shape
    if nb % (CHUNK // 2) == 0:
        return _relay_whole(b)
    full = nb - CHUNK // 4  # bytes of the whole chunks; the half chunk re-laid as a chunk padded with zero pairs,
    last = torch.zeros(rows, CHUNK // 2, dtype=b.dtype, device=b.device)  # of which lane q keeps words 0, 1
    last[:, :CHUNK // 4] = b[:, full:]
    half = _lane_halves(_relay_whole(last))[:, :, 0]
    return torch.cat([_relay_whole(b[:, :full]), half.reshape(rows, -1)], dim=1)


def _unrelay(b: torch.Tensor) -> torch.Tensor:
    rows, nb = b.shape
    if nb % (CHUNK // 2) == 0:
        return _unrelay_whole(b)
    full = nb - CHUNK // 4
    last = torch.zeros(rows, CHUNK // 2, dtype=b.dtype, device=b.device)
    _lane_halves(last)[:, :, 0] = b[:, full:].reshape(rows, 4, 8)
    return torch.cat([_unrelay_whole(b[:, :full]), _unrelay_whole(last)[:, :CHUNK // 4]], dim=1)


def relay_rega(w: torch.Tensor) -> torch.Tensor:
    """SPEC §8's packed rows -> the register-operand layout (module docstring). A new tensor."""
    return _per_slice(w, _relay)


def unrelay_rega(w: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`relay_rega`. A new tensor."""
    return _per_slice(w, _unrelay)


def relay_quantized(qw: tuple) -> tuple:
    """:func:`moekit.quantize_experts`' ``(w13_q, w2_q, w13_scale, w2_scale)`` with both packed weights re-laid."""
    return (relay_rega(qw[0]), relay_rega(qw[1]), *qw[2:])
