"""The quantised weight formats as the Triton experts kernels see them (:mod:`.triton_experts_quant`): a format's
kernel code and block sizes (:class:`QuantSpec`), its part of a tuned-config key, and the tiles it requires of a
config (:meth:`QuantSpec.fix_config`: the fixed K step of SPEC §9, the fp8 dot instruction, wgmma's row sides)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from .formats import Fp8BlockFormat, Fp8ChannelFormat, Int4GroupFormat, Mxfp4Format, WeightFormat
from .config_keys import tail_bm_value

__all__ = ["QuantSpec", "QUANT_FORMATS", "DEFAULT_FP8_ACC"]

_CODES = {"fp8_block": 1, "fp8_channel": 2, "mxfp4": 3, "int4_group": 4}
#: the formats (``fmt.name``) these kernels run: the Triton kernel table's ``quant_formats``
QUANT_FORMATS = frozenset(_CODES)
#: fp8 dots: wgmma, promoted to fp32 once per K step (= the scale block; ``fix_config``). H200, DeepSeek-V3
#: experts T=1 / 64 / 1024 / 16384: 128 -> 146 / 3517 / 4122 / 57697 µs, 32 (a promotion per k32
#: instruction serialises the wgmma chain) -> 443 / 12456 / 14618 / 155984 µs (benchmarks/quant_probe.py)
DEFAULT_FP8_ACC = 128
#: the K step of the fp8 per-row / per-tensor kernels, whatever the activations' dtype
FP8_ROW_BLOCK_K = 128


def fp8_acc_run(cfg: dict, block_k: int) -> int:
    """The ``fp8_acc`` a config runs with at K step ``block_k``: its value (default :data:`DEFAULT_FP8_ACC`), at
    most ``block_k`` (one wgmma dot spans BK: promoting every n > BK products means every BK; Triton refuses n > K)."""
    return min(int(cfg.get("fp8_acc", DEFAULT_FP8_ACC)), block_k)


@dataclass(frozen=True)
class QuantSpec:
    """What the kernels need to know of a format: ``code`` (1 fp8 block, 2 fp8 row, 3 mxfp4, 4 int4),
    ``block_n`` / ``block_k`` (fp8 block; 4-bit: ``block_k`` = the k group), ``ue8m0``, ``per_tensor``,
    ``static`` (fp8 row with given input scales), ``pack`` (values per stored element along k), ``relaid``
    (mxfp4 / int4: the packed words in :mod:`.w4_layout`'s register-operand layout, not SPEC §8's)."""

    code: int
    block_n: int = 1
    block_k: int = 1
    ue8m0: bool = False
    per_tensor: bool = False
    static: bool = False
    pack: int = 1
    relaid: bool = False

    @classmethod
    def of(cls, fmt: WeightFormat, relaid: bool = False) -> "QuantSpec":
        """The spec of ``fmt``; ``relaid``: its packed words are re-laid (4-bit formats only, else ``ValueError``).
        Cached per (format, relaid): every eager quantised call asks (formats are frozen, so hashable)."""
        return _spec_of(fmt, relaid)

    @classmethod
    def _of(cls, fmt: WeightFormat) -> "QuantSpec":
        if isinstance(fmt, Fp8BlockFormat):
            bk = fmt.block_k
            if bk < 16 or bk & (bk - 1):
                raise NotImplementedError(f"the Triton fp8 block kernels need block_k to be a power of two >= 16 "
                                          f"(one K step per scale block), got {bk}")
            return cls(1, fmt.block_n, bk, ue8m0=fmt.ue8m0)
        if isinstance(fmt, Fp8ChannelFormat):
            return cls(2, per_tensor=fmt.per_tensor, static=fmt.static_input)
        if isinstance(fmt, Mxfp4Format):
            return cls(3, block_k=32, pack=2)
        if isinstance(fmt, Int4GroupFormat):
            g = fmt.group_size
            if g & (g - 1):
                raise NotImplementedError(f"the Triton int4 kernels need a power-of-two group_size, got {g}")
            return cls(4, block_k=g, pack=8)
        raise NotImplementedError(f"no Triton kernel for quantised format {fmt!r}")

    @property
    def fp8(self) -> bool:
        return self.code <= 2

    @property
    def key(self) -> str:
        """The format's part of a tuned-config shape key."""
        if self.code == 1:
            return f"fp8_block{self.block_n}x{self.block_k}"
        if self.code == 2:
            return "fp8_tensor" if self.per_tensor else "fp8_channel"
        return "mxfp4" if self.code == 3 else f"int4_g{self.block_k}"

    def fix_config(self, cfg: dict, dtype: torch.dtype) -> dict:
        """The tiles this format requires: the K step is fixed per shape (batch invariance), fp8 block
        w13 tiles are one activation group wide (the fused re-quantisation). fp8: ``cfg["fp8_acc"]``
        (default :data:`DEFAULT_FP8_ACC`) picks the dot instruction (:func:`._triton.quant.dot_f32`); > 0
        (wgmma) needs ``BLOCK_M`` >= 64 and 4 or 8 warps in every bucket, raised here, so that no bucket
        falls back to another instruction (SPEC §9); a swapped kernel (``"SWAP": 1``, the weight tile on
        wgmma's M side) needs ``BN`` >= 64 instead, and ``BLOCK_M`` stays when both kernels are swapped; tail tiles
        (``"tail_bm"``) are token rows too: >= 64 with wgmma, refused below; a swapped
        mxfp4 / int4 kernel gets ``BN`` >= 64 too (the tiles whose bits were measured)."""
        c13, c2 = dict(cfg["w13"]), dict(cfg["w2"])
        if self.relaid and dtype == torch.float32:
            raise ValueError("re-laid 4-bit weights (the register-operand layout, laid out per 128-value K step) "
                             "need bfloat16 or float16 activations; float32 ones run K steps of 64")
        bk = self.block_k if self.code == 1 else FP8_ROW_BLOCK_K if self.code == 2 or dtype != torch.float32 else 64
        c13["BK"] = c2["BK"] = bk
        if self.code == 1:  # BN == bk: w2's input quantised in w13's epilogue (one group per tile);
            c13["BN"] = min(max(int(c13["BN"]), 32), bk)  # narrower: a separate pass (more programs at decode)
        out = {**cfg}
        wgmma = True  # 4-bit: decoded bf16 tiles; fp8: unless fp8_acc = 0 (fp16 mma.sync upcasts)
        if self.fp8:
            c2["BN"] = min(int(c2["BN"]), 128)  # the fresh fp32 dot beside the accumulator: registers
            acc = int(cfg.get("fp8_acc", DEFAULT_FP8_ACC))
            if acc < 0:
                raise ValueError(f"config fp8_acc must be >= 0 (0: exact fp16 mma; n: wgmma, promoted every n), "
                                 f"got {acc}")
            out["fp8_acc"] = acc = fp8_acc_run(cfg, bk)
            wgmma = acc > 0
            if wgmma:  # wgmma's M side (64 per warpgroup): the token rows, unless both kernels are swapped
                if not (c13.get("SWAP") and c2.get("SWAP")):
                    out["BLOCK_M"] = max(64, int(cfg["BLOCK_M"]))
                tail = tail_bm_value(cfg)
                if 0 < tail < 64:
                    raise ValueError(f'config "tail_bm" = {tail} with fp8 wgmma dots (fp8_acc = {acc}): a tail tile '
                                     f'is token rows on wgmma\'s M side too, expected 0 or >= 64')
                for c in (c13, c2):
                    c["num_warps"] = 8 if int(c["num_warps"]) >= 8 else 4
        else:  # packed tiles: the dequantised B tile needs registers / shared memory too
            c13["num_stages"] = min(int(c13["num_stages"]), 3)
            c2["num_stages"] = min(int(c2["num_stages"]), 3)
        for c in (c13, c2):
            if wgmma and c.get("SWAP"):  # the weight rows on wgmma's M side: one warpgroup per 64 of them
                c["BN"] = max(64, int(c["BN"]))
                c["num_warps"] = min(int(c["num_warps"]), c["BN"] // 16)
        out["w13"], out["w2"] = c13, c2
        return out


@functools.lru_cache(maxsize=64)
def _spec_of(fmt: WeightFormat, relaid: bool) -> QuantSpec:
    spec = QuantSpec._of(fmt)
    if relaid and spec.code not in (3, 4):
        raise ValueError(f"relaid=True is a layout of packed 4-bit weights (mxfp4, int4), not of {fmt!r}")
    return replace(spec, relaid=True) if relaid else spec
