"""Validation of kernel configs (:mod:`.triton_configs` holds the config tables, the lookup and the heuristic).

:func:`check_config` checks a whole config once, where it enters: every entry of a config file when the file is
read, and a config passed to the launchers explicitly (the tuner's candidates, a benchmark's patch). An unknown key
(``"num_warp"``, a key of an older or newer moekit) or a value of the wrong kind raises ``ValueError`` naming where
the config came from, the part, the key, the value and what is expected, instead of being ignored or failing inside
a kernel launch. Each ``*_value`` function reads one key that selects a kernel form, raises ``ValueError`` the same
way, and returns the value the launch plan uses."""

from __future__ import annotations

#: top-level keys of a config (:mod:`.triton_configs`' docstring says what each does)
TOP_KEYS = ("BLOCK_M", "w13", "w2", "tma", "pdl", "fp8_acc", "sum_pass", "w13_split", "tail_bm", "gather_pass")
#: keys of a kernel part (``"w13"`` / ``"w2"``); the first five are required
PART_KEYS = ("BN", "BK", "GROUP_M", "num_warps", "num_stages", "SWAP", "gluon", "gluon_dec", "gluon_nt", "gluon_ws",
             "gluon_rega", "gluon_early", "gluon_stack", "gluon_stages", "gluon_wbuf", "gluon_maxnreg")
_REQUIRED_PART = PART_KEYS[:5]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _pow2(v, lo: int, hi: int) -> bool:
    return _is_int(v) and lo <= v <= hi and not v & (v - 1)


def _flag(v) -> bool:
    return isinstance(v, bool) or (_is_int(v) and v in (0, 1))


#: a part's plain keys: (is the value allowed, what is expected); the kernel-form keys have their ``*_value`` checks
_PART_RULES = {"BN": (lambda v: _pow2(v, 8, 1024), "a power of two in 8..1024"),
               "BK": (lambda v: _pow2(v, 16, 1024), "a power of two in 16..1024"),
               "GROUP_M": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
               "num_warps": (lambda v: _pow2(v, 1, 16), "1, 2, 4, 8 or 16"),
               "num_stages": (lambda v: _is_int(v) and 1 <= v <= 16, "an int in 1..16"),
               "SWAP": (_flag, "0 or 1"), "gluon": (_flag, "0 or 1"),
               "gluon_stages": (lambda v: _is_int(v) and 0 <= v <= 16, "an int in 0..16 (0: by shared memory)"),
               "gluon_wbuf": (lambda v: _is_int(v) and v in (1, 2), "1 or 2 decoded tiles")}


def _check_part(part: str, c) -> None:
    """One kernel part's keys and values (``ValueError`` prefixed ``config "part"``)."""
    if not isinstance(c, dict):
        raise ValueError(f'config "{part}" = {c!r}, expected a dict of kernel keys ({", ".join(_REQUIRED_PART)}, ...)')
    unknown = [k for k in c if k not in PART_KEYS]
    if unknown:
        raise ValueError(f'config "{part}": unknown key {unknown[0]!r} (never ignored); the known keys are '
                         f'{", ".join(PART_KEYS)}')
    missing = [k for k in _REQUIRED_PART if k not in c]
    if missing:
        raise ValueError(f'config "{part}": the key {missing[0]!r} is missing (required: {", ".join(_REQUIRED_PART)})')
    for key, (ok, what) in _PART_RULES.items():
        if key in c and not ok(c[key]):
            raise ValueError(f'config "{part}": "{key}" = {c[key]!r}, expected {what}')
    gluon_ws_value(part, c)
    gluon_rega_value(part, c)
    gluon_early_value(part, c)
    gluon_maxnreg_value(part, c)
    gluon_flag_value(part, c, "gluon_stack")
    if part == "w2":
        gluon_nt_value("w2", c)
        gluon_dec_value(c, "w2")
    else:
        gluon_dec_value(c, "w13")
        if "gluon_nt" in c:
            raise ValueError(f'config "w13": "gluon_nt" = {c["gluon_nt"]!r}: column tiles per program are a key of the '
                             f'Gluon w2 only')


def check_config(cfg, where: str = "kernel config") -> None:
    """``cfg`` is a whole kernel config: the top-level keys of :data:`TOP_KEYS` (``BLOCK_M``, ``w13`` and ``w2``
    required), each part's keys of :data:`PART_KEYS` with values of the right kind, and the keys that select kernel
    forms valid (the ``*_value`` functions). Else ``ValueError`` starting with ``where`` (a file, shape and bucket, or
    "kernel config"), then the part, the key, the value and what is expected. Pure: ``cfg`` is not changed. Checks
    what a config may say, not whether a kernel form runs for a given shape and format (the launchers decide that,
    with the same bits or an error)."""
    try:
        if not isinstance(cfg, dict):
            raise ValueError(f"expected a dict with {', '.join(TOP_KEYS[:3])}, got {type(cfg).__name__}")
        unknown = [k for k in cfg if k not in TOP_KEYS]
        if unknown:
            raise ValueError(f'unknown key {unknown[0]!r} (never ignored); the known keys are {", ".join(TOP_KEYS)}')
        missing = [k for k in TOP_KEYS[:3] if k not in cfg]
        if missing:
            raise ValueError(f'the key {missing[0]!r} is missing (required: {", ".join(TOP_KEYS[:3])})')
        if not _pow2(cfg["BLOCK_M"], 16, 256):
            raise ValueError(f'"BLOCK_M" = {cfg["BLOCK_M"]!r}, expected a power of two in 16..256')
        for key in ("tma", "pdl", "w13_split", "gather_pass"):
            if key in cfg and not _flag(cfg[key]):
                raise ValueError(f'"{key}" = {cfg[key]!r}, expected true or false')
        if cfg.get("sum_pass") is not None and not _flag(cfg["sum_pass"]):
            raise ValueError(f'"sum_pass" = {cfg["sum_pass"]!r}, expected true, false or null (by slot count)')
        if "fp8_acc" in cfg and not (_is_int(cfg["fp8_acc"]) and cfg["fp8_acc"] >= 0):
            raise ValueError(f'"fp8_acc" = {cfg["fp8_acc"]!r}, expected an int >= 0 (0: exact fp16 mma; n: wgmma, '
                             f'promoted every n)')
        tail_bm_value(cfg)
        for part in ("w13", "w2"):
            _check_part(part, cfg[part])
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


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


def gluon_maxnreg_value(part: str, cfg_part: dict) -> int:
    """The ``"gluon_maxnreg"`` key of config part ``part`` (0 when absent: the compiler decides): the registers per
    thread the register-operand 4-bit GEMM is compiled for (Triton's ``maxnreg``), a multiple of 8 in 64..248, only
    beside ``"gluon_rega"``. Round 47: gpt-oss's re-laid 8-warp w2 needed 130 / 141 registers, one program per SM
    instead of two; 128 fits two with no spill. Else ``ValueError`` naming the part, the key and the value."""
    v = cfg_part.get("gluon_maxnreg", 0)
    if not _is_int(v) or not (v == 0 or (64 <= v <= 248 and v % 8 == 0)):
        raise ValueError(f'config "{part}": "gluon_maxnreg" = {v!r}, expected 0 (off) or a multiple of 8 in 64..248 '
                         f'(registers per thread)')
    if v and not gluon_rega_value(part, cfg_part):
        raise ValueError(f'config "{part}": "gluon_maxnreg" = {v!r} needs "gluon_rega" (the register-operand Gluon '
                         f'4-bit GEMM), which is {cfg_part.get("gluon_rega", 0)!r}')
    return v


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
