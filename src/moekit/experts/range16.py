"""float16 layers of weight-only formats (mxfp4, int4): the GEMM reads ``W = dequantise(codes, scales)`` rounded to
``params_dtype`` (SPEC §8), so a group whose dequantised values pass float16's range turns every token routed to the
expert non-finite. Round 67's audit: unquantised weights were refused at load (:func:`moekit.experts.params.
check_range`), 4-bit ones loaded and gave 192 of 192 outputs NaN. The check needs a shard's codes and scales together:
whole stacks (``load_expert_weights``, state dicts) are checked at once; one-shard loads (the checkpoint loader's) keep
the first of the pair given until the second comes (:class:`PendingPairs`), on float16 layers only."""
from __future__ import annotations

import torch

from .._checks import values_checkable
from ..ops.formats import WeightFormat
from ..ops.quantize import dequantize_weight
from .params import check_range


def applies(dtype: torch.dtype, fmt: WeightFormat | None) -> bool:
    """Whether a layer of ``params_dtype`` ``dtype`` and weight format ``fmt`` needs the check."""
    return dtype == torch.float16 and fmt is not None and not fmt.quantizes_activations


def check_stacks(dtype: torch.dtype, fmt: WeightFormat | None, codes: torch.Tensor, scale: torch.Tensor, what: str,
                 shards: int | None = None) -> None:
    """``ValueError`` (:func:`check_range`'s) naming ``what`` and the expert where a dequantised weight of
    ``codes [E, N, K / pack]`` with ``scale`` would be a finite value beyond float16's range; one expert at a time
    (float32 of one expert, not of the stack)."""
    if not applies(dtype, fmt) or not (values_checkable(codes) and values_checkable(scale)):
        return
    for e in range(codes.shape[0]):
        check_range(dtype, dequantize_weight(codes[e], scale[e], fmt, shards=shards), f"{what} of expert {e}")


def check_named(experts, tensors: dict, prefix: str = "", what: str = "") -> None:
    """:func:`check_stacks` over the ``{prefix}w13_weight`` / ``_scale`` and ``w2`` pairs of ``tensors`` (a state dict
    being loaded, or ``load_expert_weights``' checked stacks) for the layer ``experts``."""
    c = experts.moe_config
    if not applies(c.params_dtype, experts.quant):
        return
    for side in ("w13", "w2"):
        codes, scale = tensors.get(f"{prefix}{side}_weight"), tensors.get(f"{prefix}{side}_scale")
        if isinstance(codes, torch.Tensor) and isinstance(scale, torch.Tensor):
            shards = 2 if side == "w13" and c.gated else None
            check_stacks(c.params_dtype, experts.quant, codes, scale, f"{what}{side}", shards)


def pending_pairs(experts) -> "PendingPairs":
    """The layer's :class:`PendingPairs` (made on first use)."""
    if "_pending_pairs" not in experts.__dict__:
        experts.__dict__["_pending_pairs"] = PendingPairs()
    return experts.__dict__["_pending_pairs"]


class PendingPairs:
    """One-shard loads of a float16 weight-only layer: each shard's codes or scales, kept until the other comes."""

    def __init__(self):
        self.waiting: dict[tuple[int, str], dict[str, torch.Tensor]] = {}

    def given(self, dtype, fmt, logical_id: int, shard_id: str, kind: str, tensor: torch.Tensor, what: str) -> None:
        """Record ``tensor`` (``kind`` "weight" or "scale" of one full shard, in storage form); check the pair once
        both are here (``ValueError`` before the second is written)."""
        if not applies(dtype, fmt) or kind not in ("weight", "scale"):
            return
        key = (logical_id, shard_id)
        parts = self.waiting.setdefault(key, {})
        parts[kind] = tensor
        if len(parts) == 2:
            del self.waiting[key]
            check_range(dtype, dequantize_weight(parts["weight"], parts["scale"], fmt), f"{what} (dequantised)")
