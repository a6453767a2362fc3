"""The tuner's shared-memory estimate of a candidate's GEMMs, against the sm_90 limit (:class:`.tune_space.Space`
refuses a candidate above it and fits a start to it)."""

from __future__ import annotations

#: shared memory per block on sm_90 (227 KiB)
SMEM_BYTES = 232448


def smem_estimate(cfg: dict, which: str, elt: float, w_elt: float, gated: bool) -> float:
    """Shared-memory bytes of one GEMM's pipelined A and B tiles (w13 gated loads gate and up tiles; ``elt`` /
    ``w_elt``: bytes per activation / weight element).

    Triton 3.6's sm_90 compiles (round 57, CPU; ``tests/test_tune_fit.py``) keep a ring of ``num_stages`` tiles where
    the dot is a wgmma — 16-bit or fp8 operands (fp8 not with ``fp8_acc`` 0: float32 FMA dots) and its M side
    (BLOCK_M, or a swapped tile's BN) at least 64 — and ``num_stages - 1`` elsewhere (mma.sync, float32 FMA dots),
    with or without TMA: within 1 KiB for the unquantised and fp8 GEMMs. The ``- 1`` everywhere before let a BLOCK_K 128
    start of 294 KB through, which failed at launch. 4-bit GEMMs keep ``num_stages - 1`` packed tiles, a lower bound
    (their scales and staging add more), so that no tile that fits is refused."""
    c = cfg[which]
    nb = 2 if which == "w13" and gated else 1
    per_stage = cfg["BLOCK_M"] * c["BK"] * elt + nb * c["BN"] * c["BK"] * w_elt
    mma_m = c["BN"] if c.get("SWAP") else cfg["BLOCK_M"]
    wgmma = mma_m >= 64 and 1 <= w_elt and elt <= 2 and not (w_elt == 1 and cfg.get("fp8_acc") == 0)
    ring = int(c["num_stages"]) if wgmma else int(c["num_stages"]) - 1
    return per_stage * max(ring, 1)
