"""Quantised expert weight formats (SPEC §8) and :func:`parse_quant_config`.

A format object is a small frozen dataclass: what the expert tensors look like on the layer
(``w13 [E, 2I|I, ·]``, ``w2 [E, H, ·]`` and their scales), what it costs per expert, which modules it
leaves in full precision, and which sizes it can hold. The numerics live in :mod:`.quantize`.

=================  ===========================  ==============================================
``name``           weights (storage dtype)      scales
=================  ===========================  ==============================================
``fp8_block``      float8_e4m3fn ``[E, N, K]``  fp32 ``[E, ⌈N/bn⌉, ⌈K/bk⌉]`` (w13: per shard)
``fp8_channel``    float8_e4m3fn ``[E, N, K]``  fp32 ``[E, N]``; per tensor ``[E, 2|1]`` / ``[E]``
``mxfp4``          uint8 ``[E, N, K/2]``        uint8 e8m0 ``[E, N, K/32]``
``int4_group``     int32 ``[E, N, K/8]``        float ``[E, N, K/g]`` (bf16 as checkpoints ship)
=================  ===========================  ==============================================

Module-name matching (``is_ignored`` / ``applies_to``): a pattern ``re:<regex>`` matches with
``re.match`` on the full name (compressed-tensors); any other pattern matches when its dotted parts
appear as a contiguous run of the name's parts, each part compared with ``fnmatch`` (so ``"gate"``
matches ``model.layers.3.mlp.gate`` but not ``gate_proj``, and ``model.layers.*.self_attn`` matches
``model.layers.0.self_attn.q_proj``). The target ``"Linear"`` matches every module.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from collections.abc import Iterable
from typing import ClassVar

import torch

__all__ = [
    "WeightFormat",
    "Fp8BlockFormat",
    "Fp8ChannelFormat",
    "Mxfp4Format",
    "Int4GroupFormat",
    "parse_quant_config",
]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _name_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    want, have = pattern.split("."), name.split(".")
    return any(
        all(fnmatchcase(h, w) for h, w in zip(have[i : i + len(want)], want))
        for i in range(len(have) - len(want) + 1)
    )


def _check_positive(arg: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{arg} must be a positive int, got {v!r}")


def _check_fields(obj, ints=(), bools=()) -> None:
    for arg in ints:
        _check_positive(arg, getattr(obj, arg))
    for arg in bools:
        if not isinstance(getattr(obj, arg), bool):
            raise TypeError(f"{arg} must be a bool, got {getattr(obj, arg)!r}")


def str_tuple(v) -> tuple[str, ...] | None:
    """``v`` (a list, tuple or generator of module names) as a tuple of str; None where it is not one (a str, a number,
    an item that is not a str). A generator is read once (round 62)."""
    if isinstance(v, str) or not isinstance(v, Iterable):
        return None
    v = tuple(v)
    return v if all(isinstance(p, str) for p in v) else None


@dataclass(frozen=True)
class WeightFormat:
    """Base of the format objects. ``ignore``: module patterns kept in full precision; ``targets``:
    module patterns the format applies to (``"Linear"`` = all)."""

    ignore: tuple[str, ...] = field(default=(), kw_only=True)
    targets: tuple[str, ...] = field(default=("Linear",), kw_only=True)

    name: ClassVar[str] = ""
    weight_dtype: ClassVar[torch.dtype] = torch.uint8
    scale_dtype: ClassVar[torch.dtype] = torch.float32
    #: True when activations are quantised too (w8a8); False for weight-only formats
    quantizes_activations: ClassVar[bool] = False
    pack: ClassVar[int] = 1  # logical values per stored element along k
    k_group: ClassVar[int] = 1  # k values sharing one scale (weight-only formats)

    def __post_init__(self):
        for arg in ("ignore", "targets"):
            names = str_tuple(getattr(self, arg))
            if names is None:
                raise TypeError(f"{arg} must be a sequence of str, got {getattr(self, arg)!r}")
            object.__setattr__(self, arg, names)

    # ---- module selection
    def is_ignored(self, module_name: str) -> bool:
        """True when ``module_name`` stays in full precision (matches an ``ignore`` pattern)."""
        return any(_name_matches(p, module_name) for p in self.ignore)

    def applies_to(self, module_name: str) -> bool:
        """True when ``module_name`` is quantised: it matches a target and no ignore pattern."""
        return self.targets_match(module_name) and not self.is_ignored(module_name)

    def targets_match(self, module_name: str) -> bool:
        """True when a target names ``module_name`` (``"Linear"``: every linear)."""
        return any(t == "Linear" or _name_matches(t, module_name) for t in self.targets)

    # ---- shapes
    @staticmethod
    def _rows(inter: int, gated: bool) -> int:
        return 2 * inter if gated else inter

    def w13_shape(self, e: int, inter: int, hidden: int, gated: bool = True) -> tuple[int, ...]:
        return (e, self._rows(inter, gated), hidden // self.pack)

    def w2_shape(self, e: int, inter: int, hidden: int, gated: bool = True) -> tuple[int, ...]:
        return (e, hidden, inter // self.pack)

    # weight-only formats: one scale per row and per ``k_group`` along k (fp8 formats override these)
    def w13_scale_shape(self, e: int, inter: int, hidden: int, gated: bool = True) -> tuple[int, ...]:
        return (e, self._rows(inter, gated), hidden // self.k_group)

    def w2_scale_shape(self, e: int, inter: int, hidden: int, gated: bool = True) -> tuple[int, ...]:
        return (e, hidden, inter // self.k_group)

    def bytes_per_expert(self, inter: int, hidden: int, gated: bool = True) -> int:
        """Bytes of one expert's w13 + w2 and their scales as a layer holds them: float scales in float32 (int4's
        ship bf16; round 63: counted bf16, below what the layer holds and the kernels read), e8m0 bytes as bytes."""
        held = torch.float32 if self.scale_dtype.is_floating_point else self.scale_dtype
        shapes = (
            (self.w13_shape(1, inter, hidden, gated), self.weight_dtype),
            (self.w2_shape(1, inter, hidden, gated), self.weight_dtype),
            (self.w13_scale_shape(1, inter, hidden, gated), held),
            (self.w2_scale_shape(1, inter, hidden, gated), held),
        )
        return sum(math.prod(s) * d.itemsize for s, d in shapes)

    def validate(self, e: int, inter: int, hidden: int, gated: bool = True) -> None:
        """Raise ``ValueError`` where this format cannot hold experts of these sizes."""
        for arg, v in (("E", e), ("I", inter), ("H", hidden)):
            _check_positive(arg, v)
        self._check_multiple(inter, hidden)

    def _check_multiple(self, inter: int, hidden: int) -> None:
        m = self.multiple
        for arg, v in (("hidden size H", hidden), ("intermediate size I", inter)):
            if v % m:
                raise ValueError(f"{self.name} needs the {arg} to be a multiple of {m}, got {v}")

    multiple: ClassVar[int] = 1

    # ---- tensor-parallel slices of I
    def scale_units(self) -> tuple[int | None, int | None]:
        """``(rows, cols)``: rows of a w13 shard one row of ``w13_scale`` covers (None: one scale per
        shard, per tensor), and I values one column of ``w2_scale`` covers (None: no I dimension)."""
        return 1, self.k_group

    def tp_multiple(self) -> int:
        """A tensor-parallel slice of I must start and end on multiples of this (scale blocks and packing)."""
        rows, cols = self.scale_units()
        return math.lcm(rows or 1, cols or 1, self.pack)


@dataclass(frozen=True)
class Fp8BlockFormat(WeightFormat):
    """fp8 e4m3 weights with one fp32 scale per ``[block_n, block_k]`` block; activations quantised
    dynamically per token and group of ``block_k``. ``ue8m0``: scales are powers of two.
    ``ignore`` / ``targets`` (keyword-only): as in :class:`WeightFormat`.
    """

    block_n: int = 128
    block_k: int = 128
    ue8m0: bool = False

    name: ClassVar[str] = "fp8_block"
    weight_dtype: ClassVar[torch.dtype] = torch.float8_e4m3fn
    quantizes_activations: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        _check_fields(self, ints=("block_n", "block_k"), bools=("ue8m0",))

    def w13_scale_shape(self, e, inter, hidden, gated=True):
        shards = 2 if gated else 1
        return (e, shards * _cdiv(inter, self.block_n), _cdiv(hidden, self.block_k))

    def w2_scale_shape(self, e, inter, hidden, gated=True):
        return (e, _cdiv(hidden, self.block_n), _cdiv(inter, self.block_k))

    def scale_units(self):
        return self.block_n, self.block_k


@dataclass(frozen=True)
class Fp8ChannelFormat(WeightFormat):
    """fp8 e4m3 weights with one fp32 scale per output row (``per_tensor``: per shard / tensor);
    activations quantised per token (dynamic) or with a given per-tensor scale (``static_input``).
    ``ignore`` / ``targets`` (keyword-only): as in :class:`WeightFormat`.
    """

    per_tensor: bool = False
    static_input: bool = False

    name: ClassVar[str] = "fp8_channel"
    weight_dtype: ClassVar[torch.dtype] = torch.float8_e4m3fn
    quantizes_activations: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        _check_fields(self, bools=("per_tensor", "static_input"))

    def w13_scale_shape(self, e, inter, hidden, gated=True):
        return (e, 2 if gated else 1) if self.per_tensor else (e, self._rows(inter, gated))

    def w2_scale_shape(self, e, inter, hidden, gated=True):
        return (e,) if self.per_tensor else (e, hidden)

    def scale_units(self):
        return (None if self.per_tensor else 1), None

    def input_scale_shape(self, e: int) -> tuple[int, ...]:
        """``w13_input_scale`` / ``w2_input_scale``: ``[E]`` fp32 (static inputs only)."""
        return (e,)


@dataclass(frozen=True)
class Mxfp4Format(WeightFormat):
    """OCP MX fp4: e2m1 codes two per byte (low nibble = even k), one e8m0 scale per 32 along k.
    ``ignore`` / ``targets`` (keyword-only): as in :class:`WeightFormat`.
    """

    name: ClassVar[str] = "mxfp4"
    weight_dtype: ClassVar[torch.dtype] = torch.uint8
    scale_dtype: ClassVar[torch.dtype] = torch.uint8
    pack: ClassVar[int] = 2
    multiple: ClassVar[int] = 32
    k_group: ClassVar[int] = 32


@dataclass(frozen=True)
class Int4GroupFormat(WeightFormat):
    """Symmetric int4 with one scale per ``group_size`` along k, packed eight per int32
    (compressed-tensors ``pack-quantized``).
    ``ignore`` / ``targets`` (keyword-only): as in :class:`WeightFormat`.
    """

    group_size: int = 32

    name: ClassVar[str] = "int4_group"
    weight_dtype: ClassVar[torch.dtype] = torch.int32
    scale_dtype: ClassVar[torch.dtype] = torch.bfloat16
    pack: ClassVar[int] = 8

    def __post_init__(self):
        super().__post_init__()
        _check_fields(self, ints=("group_size",))

    @property
    def multiple(self) -> int:  # groups and the 8-per-int32 packing both tile k
        """H and I must be multiples of this: ``lcm(group_size, 8)``."""
        return math.lcm(self.group_size, 8)

    @property
    def k_group(self) -> int:
        """k values sharing one scale: ``group_size``."""
        return self.group_size
