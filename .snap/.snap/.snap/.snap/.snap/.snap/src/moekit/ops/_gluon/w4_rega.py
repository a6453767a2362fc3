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
(``benchmarks/relaid_probe.py``, docs/kernels.md round 44). Rows of 128 n + 64 values (gpt-oss's 2880, round 45) end
in a half chunk, lane q's first two words at 2q: ``HALF`` (``RELAID`` and not ``EVEN_K``), the last K step copies them
to a whole chunk's places in 8-byte pieces and zero-fills the rest (``.w4_ring._issue_w``), so the decode is the same;
every other step is whole. Compiled for sm_90 on the CPU (gpt-oss, BN 64): mxfp4 w13 692 -> 649, w2 401 -> 362; int4
560 -> 487, 334 -> 287 instructions in the loop; not yet run on a GPU (``w4_layout.LAYER_HALF_CHUNKS``).

The fragments' decode (the asm strings, the words layouts, ``_frag`` / ``_frag_scales``) lives in :mod:`.w4_frag`;
this module holds the two kernels and their ring.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from .w4 import _acc_layout, _block_rows, _nvmma, _token_operand, _w2_store, _w13_store, _x_operand
from .w4_ring import _PLAIN, _a_layout, _half_tail, _issue_step, _p_layout, _pack, _w_ptrs
from .w4_frag import _frag, _frag_scales
from .common import pid_to_tile
from .compat import cta_barrier

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
    PACK: gl.constexpr = _pack(QUANT)
    HALF: gl.constexpr = RELAID and not EVEN_K  # re-laid rows ending in a half chunk (gpt-oss's 2880)
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
        t_delta, t_keep = _half_tail(P_L, NG, G // PACK, 32 // PACK)
        ws_g = ws_ptr + e.to(gl.int64) * stride_wse
        ws_u = ws_g + I.to(gl.int64) * stride_wsn
        x_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BM, BK], _nvmma(BM, BK))
        p_smem = gl.allocate_shared_memory(w1_ptr.dtype.element_ty, [2 * STAGES, BN, NG, G // PACK], _PLAIN)
        nk = gl.cdiv(H, BK)
        for st in gl.static_range(STAGES - 1):
            _issue_step(x_smem, p_smem, x_ptrs, x_mask, offs_v, H, g_ptrs, u_ptrs, w_mask, vid, KP, st, nk, STAGES, BK,
                        PACK, EVEN_K, 2, HALF, t_delta, t_keep)
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
                            nk, STAGES, BK, PACK, EVEN_K, 2, HALF, t_delta, t_keep)
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
                            k + STAGES - 1, nk, STAGES, BK, PACK, EVEN_K, 2, HALF, t_delta, t_keep)
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
    PACK: gl.constexpr = _pack(QUANT)
    HALF: gl.constexpr = RELAID and not EVEN_K  # re-laid rows ending in a half chunk (gpt-oss's 2880)
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
        t_delta, t_keep = _half_tail(P_L, NG, G // PACK, 32 // PACK)
        ws_e = ws_ptr + e.to(gl.int64) * stride_wse
        x_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BM, BK], _nvmma(BM, BK))
        p_smem = gl.allocate_shared_memory(w2_ptr.dtype.element_ty, [STAGES, BN, NG, G // PACK], _PLAIN)
        nk = gl.cdiv(I, BK)
        for st in gl.static_range(STAGES - 1):
            _issue_step(x_smem, p_smem, x_ptrs, x_mask, offs_v, I, w_ptrs, w_ptrs, w_mask, vid, KP, st, nk, STAGES, BK,
                        PACK, EVEN_K, 1, HALF, t_delta, t_keep)
        n0 = pid_n * BN
        s0 = _frag_scales(ws_e, n0, H, stride_wsn, 0, NKG, BN, BK, G, EVEN_K, num_warps, SWORD)
        s1 = _frag_scales(ws_e, n0, H, stride_wsn, 1, NKG, BN, BK, G, EVEN_K, num_warps, SWORD)
        acc = gl.zeros([BN, BM], gl.float32, layout=ACC_L)
        for k in range(nk):
            s2 = _frag_scales(ws_e, n0, H, stride_wsn, k + 2, NKG, BN, BK, G, EVEN_K, num_warps, SWORD)
            _ready(STAGES)
            if EARLY:
                _issue_step(x_smem, p_smem, x_ptrs, x_mask, offs_v, I, w_ptrs, w_ptrs, w_mask, vid, KP, k + STAGES - 1,
                            nk, STAGES, BK, PACK, EVEN_K, 1, HALF, t_delta, t_keep)
            slot = k % STAGES
            w = _frag(p_smem.index(slot), s0, QUANT, BN, BK, G, ACC_L, num_warps, SWORD, RELAID)
            acc = _mma_waited(w, x_smem.index(slot).permute((1, 0)), acc)
            if not EARLY:
                cta_barrier()
                _issue_step(x_smem, p_smem, x_ptrs, x_mask, offs_v, I, w_ptrs, w_ptrs, w_mask, vid, KP, k + STAGES - 1,
                            nk, STAGES, BK, PACK, EVEN_K, 1, HALF, t_delta, t_keep)
            s0, s1 = s1, s2
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        async_copy.wait_group(0)

        _w2_store(acc, e, pid_m, pid_n, first, n_e, b2_ptr, tw_ptr, sorted_ptr, part_ptr, H, K, stride_be, stride_twt,
                  stride_pr, BM, BN, True, ACC_L, HAS_BIAS, ON_INPUT)

