"""Validation of the kernel config keys that select kernel forms (:mod:`.triton_configs` holds the config
tables, the lookup and the heuristic): each ``*_value`` function reads one key, raises ``ValueError`` naming the
part, the key, the value and what is expected, and returns the value the launch plan uses."""

from __future__ import annotations


def gluon_ws_value(part: str, cfg_part: dict) -> int:
    """The ``"gluon_ws"`` key of config part ``part`` (``"w13"`` / ``"w2"``; 0 when absent): an int >= 0, else
    ``ValueError`` naming the key, the value and what is expected. What a positive count means depends on the
    weights (fp8 block: consumer warpgroups, 1 or 2; mxfp4 / int4: decoded slots, 2-8); a count the kernel does not
    cover runs the one-warpgroup Gluon GEMM (:func:`moekit.ops.gluon_experts.fp8_w13_ws_ok`, ``fp8_w2_ws_ok``)."""
    v = cfg_part.get("gluon_ws", 0)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f'config "{part}": "gluon_ws" = {v!r}, expected an int >= 0 (0: off; fp8 block weights: '
                         f'1 or 2 consumer warpgroups of the warp-specialised GEMM; mxfp4 / int4: 2-8 decoded slots)')
    return v


def gluon_nt_value(part: str, cfg_part: dict) -> int:
    """The ``"gluon_nt"`` key of config part ``part`` (1 when absent): the column tiles a Gluon fp8 w2 program
    computes one after the other, an int in 1..16, else ``ValueError`` naming the part, the key and the value."""
    v = cfg_part.get("gluon_nt", 1)
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 16:
        raise ValueError(f'config "{part}": "gluon_nt" = {v!r}, expected an int in 1..16 (column tiles per program)')
    return v


def gluon_dec_value(cfg_part: dict, part: str = "w2") -> int:
    """The ``"gluon_dec"`` key of config part ``part`` (0 when absent). ``"w2"``: 0 off, 1 the Gluon fp8 decode w2
    (:mod:`moekit.ops._gluon.fp8_w2_dec`), 2 its warp-specialised form (the loads in a producer warp,
    :mod:`moekit.ops._gluon.fp8_w2_dec_ws`: one column tile per program, so ``"gluon_nt"`` must be 1). ``"w13"``: 0
    off, 1 the Gluon fp8 decode w13 (:mod:`moekit.ops._gluon.fp8_w13_dec`, warp-specialised). A bool is 0 / 1. Else
    ``ValueError`` naming the part, the key, the value and what is expected."""
    v = cfg_part.get("gluon_dec", 0)
    if part == "w13":
        if not isinstance(v, int) or v not in (0, 1):
            raise ValueError(f'config "w13": "gluon_dec" = {v!r}, expected 0 or 1 (off, the Gluon fp8 decode w13)')
        return int(v)
    if not isinstance(v, int) or v not in (0, 1, 2):
        raise ValueError(f'config "w2": "gluon_dec" = {v!r}, expected 0, 1 or 2 (off, the Gluon fp8 decode w2, its '
                         f'warp-specialised form)')
    if v == 2 and gluon_nt_value("w2", cfg_part) != 1:
        raise ValueError(f'config "w2": "gluon_dec" = 2 (the warp-specialised decode w2, one column tile per '
                         f'program) cannot be combined with "gluon_nt" = {cfg_part["gluon_nt"]!r}; expected 1')
    return int(v)


def gluon_flag_value(part: str, cfg_part: dict, key: str) -> bool:
    """An on / off key of config part ``part`` (``"gluon_stack"``; off when absent): 0, 1 or a bool, else
    ``ValueError`` naming the part, the key and the value."""
    v = cfg_part.get(key, 0)
    if v not in (0, 1) or not isinstance(v, (int, bool)):
        raise ValueError(f'config "{part}": "{key}" = {v!r}, expected 0 or 1')
    return bool(v)


def gluon_rega_value(part: str, cfg_part: dict) -> int:
    """The ``"gluon_rega"`` key of config part ``part`` (0 when absent): 0 off, 1 the register-operand Gluon 4-bit
    GEMM, 2 (w13 only) the same with gate, then up, each fragment waited for before the next is decoded (one fragment
    live: 111-122 registers instead of 145-156, four programs per SM instead of three); a bool is 0 / 1. Else
    ``ValueError``."""
    v = cfg_part.get("gluon_rega", 0)
    allowed = (0, 1, 2) if part == "w13" else (0, 1)
    if not isinstance(v, int) or v not in allowed:
        raise ValueError(f'config "{part}": "gluon_rega" = {v!r}, expected one of {list(allowed)}')
    return int(v)


def gluon_early_value(part: str, cfg_part: dict) -> bool:
    """The ``"gluon_early"`` key of config part ``part`` (off when absent): 0 / 1 (a bool is 0 / 1), and 1 only beside
    ``"gluon_rega"`` (the register-operand 4-bit GEMMs refill a ring slot right after a step's first barrier,
    :mod:`moekit.ops._gluon.w4_rega`); else ``ValueError`` naming the part, the key and the value."""
    on = gluon_flag_value(part, cfg_part, "gluon_early")
    if on and not gluon_rega_value(part, cfg_part):
        raise ValueError(f'config "{part}": "gluon_early" = {cfg_part["gluon_early"]!r} needs "gluon_rega" (the '
                         f'register-operand Gluon 4-bit GEMM), which is {cfg_part.get("gluon_rega", 0)!r}')
    return on


def tail_bm_value(cfg: dict) -> int:
    """The top-level ``"tail_bm"`` key (0 when absent): tail blocks of BS rows (:mod:`moekit.ops._triton.align`).
    A power of two with 16 <= BS < BLOCK_M, else ``ValueError`` naming the key, the value and what is expected.
    With tail blocks an expert's last rows (at most BS of them past its last whole BLOCK_M block) run in a
    BS-row tile of the same kernels instead of a padded BLOCK_M tile; the Triton GEMMs only (not with SWAP tiles
    or a Gluon GEMM: the launch plan refuses those)."""
    v = cfg.get("tail_bm", 0)
    if v == 0 and not isinstance(v, bool):
        return 0
    bm = cfg.get("BLOCK_M")
    if isinstance(v, bool) or not isinstance(v, int) or v < 16 or v & (v - 1) or not isinstance(bm, int) or v >= bm:
        raise ValueError(f'config "tail_bm" = {v!r}, expected 0 (off) or a power of two >= 16 and below BLOCK_M '
                         f'({bm!r})')
    return v


def tail_conflicts(c13: dict, c2: dict) -> list[str]:
    """The kernel keys of config parts ``c13`` / ``c2`` that rule tail blocks out: swapped or Gluon GEMMs (their
    layouts are BLOCK_M blocks), as ``'"w13": "SWAP"'`` strings for an error message; empty when none does."""
    return [f'"{part}": "{key}"' for part, c in (("w13", c13), ("w2", c2)) for key in ("SWAP", "gluon") if c.get(key)]
