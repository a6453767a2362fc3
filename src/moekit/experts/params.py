"""The per-expert tensors of :class:`~moekit.experts.routed.RoutedExperts`: names, shapes, dtypes, and
how a rank's tensor-parallel share is cut out of one expert's full (checkpoint-sized) shard.

Every tensor is ``[E_local, ...]``. One expert's shard before the TP split (``I`` whole, ``I_l = I / tp``
the rank's slice ``[a, b)`` of I; ``pack`` values per stored element; ``(ru, cu) = fmt.scale_units()``):

=================  ====================  ====================================  ================
name               kind                  one shard (full)                      TP slice
=================  ====================  ====================================  ================
w13_weight         weight                gate/up ``[I, H/pack]``               rows ``[a, b)``
w2_weight          weight                down ``[H, I/pack]``                  cols ``[a/pack, b/pack)``
w13_bias           bias                  ``[I]``                               rows ``[a, b)``
w2_bias            bias                  ``[H]``                               none
w13_scale          scale                 ``[⌈I/ru⌉, …]`` (``ru`` None: ``[1]``)  rows ``[a/ru, ⌈b/ru⌉)``
w2_scale           scale                 ``[…, ⌈I/cu⌉]`` (``cu`` None: no I)     cols ``[a/cu, ⌈b/cu⌉)``
w13_input_scale    input_scale           ``[]`` (gate and up: one per expert)  none
w2_input_scale     input_scale           ``[]``                                none
=================  ====================  ====================================  ================

A w13 tensor holds its shards one after the other along dim 1 (gate rows, then up rows; relu2: gate
only). Scales are stored as the kernels read them: float32 for fp8 and int4 (lossless for the fp32,
bf16 or fp16 scales checkpoints and :func:`moekit.quantize_experts` produce), uint8 e8m0 for mxfp4.
Input scales are float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._checks import FLOAT_DTYPES, check_finite, values_checkable
from ..ops.formats import Fp8ChannelFormat, WeightFormat
from ..ops.quantize import check_quant_weights, quantize_experts
from ..ops.w4_layout import relay_rega
from .layout import DOWN, GATE, UP

KINDS = ("weight", "bias", "scale", "input_scale")
_E8M0 = getattr(torch, "float8_e8m0fnu", None)
_FP4X2 = getattr(torch, "float4_e2m1fn_x2", None)  # two e2m1 codes per byte (DeepSeek-V4's own expert dtype)


@dataclass(frozen=True)
class ExpertTensor:
    """One per-expert tensor: ``shard_shape`` is one shard of one expert before the TP split."""

    name: str
    kind: str
    shards: tuple[str, ...]
    shard_shape: tuple[int, ...]
    dtype: torch.dtype
    unit: int | None  # w13: I rows per dim-0 row; w2: I values per last-dim column; None: not sliced

    @property
    def w13(self) -> bool:
        return DOWN not in self.shards

    def cut(self, tp: slice) -> slice | None:
        """The index range of this rank's share along the sliced dim (None: the whole tensor)."""
        if self.unit is None or self.kind == "input_scale":
            return None
        return slice(tp.start // self.unit, -(-tp.stop // self.unit))  # (a partial last block: ⌈b/unit⌉)

    def take(self, full: torch.Tensor, tp: slice) -> torch.Tensor:
        """One full shard -> this rank's share (a view)."""
        cut = self.cut(tp)
        if cut is None:
            return full
        return full[cut] if self.w13 else full[..., cut]

    def local_shape(self, num_local: int, tp: slice) -> tuple[int, ...]:
        """``[E_local, ...]`` of the parameter on a rank holding ``tp`` of I."""
        cut, shape = self.cut(tp), list(self.shard_shape)
        if cut is not None:
            shape[0 if self.w13 else -1] = cut.stop - cut.start
        if self.kind == "input_scale":
            return (num_local,)
        if self.w13:
            shape[0] *= len(self.shards)
        return (num_local, *shape)

    def write(self, param: torch.Tensor, slot: int, shard: str, full: torch.Tensor, tp: slice,
              relay: bool = False) -> None:
        """Copy this rank's share of one full shard into ``param[slot]`` (dtype already converted); ``relay``
        (packed 4-bit weights): re-laid for the register-operand GEMMs after the TP cut
        (:func:`moekit.ops.w4_layout.relay_rega`: along each row's own K, so any rows may be written)."""
        part = self.take(full, tp)
        self.shard_rows(param[slot], shard).copy_(relay_rega(part) if relay and self.kind == "weight" else part)

    def shard_rows(self, t: torch.Tensor, shard: str) -> torch.Tensor:
        """One slot's ``t`` (the layer's local ``[rows, ...]``) -> ``shard``'s part, a view (the rows of :meth:`write`:
        a w13 tensor holds its shards' rows one after the other, gate then up; any other holds one shard)."""
        if not self.w13 or len(self.shards) == 1:
            return t
        n = t.shape[0] // len(self.shards)
        return t.narrow(0, self.shards.index(shard) * n, n)


def expert_tensors_spec(hidden: int, inter: int, gated: bool, has_bias: bool, params_dtype: torch.dtype,
                        fmt: WeightFormat | None) -> dict[str, ExpertTensor]:
    """The tensors of an expert of sizes ``H = hidden``, full ``I = inter`` in ``fmt`` (None: unquantised)."""
    up = (GATE, UP) if gated else (GATE,)
    down = (DOWN,)
    out = []
    if fmt is None:
        out += [ExpertTensor("w13_weight", "weight", up, (inter, hidden), params_dtype, 1),
                ExpertTensor("w2_weight", "weight", down, (hidden, inter), params_dtype, 1)]
    else:
        pack, (ru, cu) = fmt.pack, fmt.scale_units()
        s13 = fmt.w13_scale_shape(1, inter, hidden, False)[1:]  # one shard
        s2 = fmt.w2_scale_shape(1, inter, hidden, gated)[1:]
        scale_dtype = torch.float32 if fmt.scale_dtype.is_floating_point else fmt.scale_dtype
        out += [ExpertTensor("w13_weight", "weight", up, (inter, hidden // pack), fmt.weight_dtype, 1),
                ExpertTensor("w2_weight", "weight", down, (hidden, inter // pack), fmt.weight_dtype, pack),
                ExpertTensor("w13_scale", "scale", up, s13 if ru is not None else (1,), scale_dtype, ru),
                ExpertTensor("w2_scale", "scale", down, s2, scale_dtype, cu)]
        if getattr(fmt, "static_input", False):
            out += [ExpertTensor("w13_input_scale", "input_scale", up, (), torch.float32, None),
                    ExpertTensor("w2_input_scale", "input_scale", down, (), torch.float32, None)]
    if has_bias:
        out += [ExpertTensor("w13_bias", "bias", up, (inter,), params_dtype, 1),
                ExpertTensor("w2_bias", "bias", down, (hidden,), params_dtype, None)]
    return {t.name: t for t in out}


def check_tp_split(fmt: WeightFormat | None, inter: int, tp_size: int) -> None:
    """A TP slice of I must fall on the format's scale blocks and packing; else ``ValueError``. fp8 with dynamic
    per-token activations whose group is the whole row (per-channel / per-tensor weights): ``NotImplementedError``,
    as a rank would scale w2's input by the amax of its slice of I, not of the row (round 46: 1.2-1.8e-2 relative
    RMS off the single-process layer; SPEC §8 allows 5e-3)."""
    if fmt is None or tp_size == 1:
        return
    if isinstance(fmt, Fp8ChannelFormat) and not fmt.static_input:
        raise NotImplementedError(
            f"tensor parallelism (tp_size={tp_size}) with {fmt.name} and dynamic per-token activations: w2's input "
            f"is quantised per token over the whole row of I, which a rank holds only a slice of; use expert "
            f"parallelism, static input scales or block fp8"
        )
    m = fmt.tp_multiple()
    if (inter // tp_size) % m:
        sizes = [n for n in range(2, inter // m + 1) if (inter // m) % n == 0] if inter % m == 0 else []
        # (I off the block boundaries: partial blocks; I = m: one block; round 67: "128 is not a multiple of 128")
        why = f"is not a multiple of {m}, so no TP size above 1 fits" if inter % m else \
            f"is a single block of {m}, which no TP size above 1 can split"
        fix = (f"TP sizes that fit: {', '.join(map(str, sizes[:8]))}{' ...' if len(sizes) > 8 else ''}; use one of "
               "those, expert parallelism, or no TP" if sizes else f"intermediate_size {inter} {why}: use expert "
               "parallelism or no TP")
        raise ValueError(
            f"tensor parallelism over {tp_size} ranks splits intermediate_size {inter} into slices of "
            f"{inter // tp_size}, which do not fall on the {fmt.name} boundaries ({fmt}: slices must be "
            f"multiples of {m}); {fix}"
        )


def stored(spec: ExpertTensor, t: torch.Tensor, what: str) -> torch.Tensor:
    """``t`` in ``spec.dtype``: floats (and e8m0 scales) are converted; quantised codes must already
    be in the storage dtype (int8 and float4_e2m1fn_x2 codes are read as uint8, the same bytes). Else ``TypeError``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype == spec.dtype:
        return t
    if spec.dtype == torch.uint8 and t.dtype in (torch.int8, _E8M0, _FP4X2):
        return t.view(torch.uint8)
    if spec.dtype in FLOAT_DTYPES and (t.dtype in FLOAT_DTYPES or (t.dtype == _E8M0 and spec.kind == "scale")):
        return t.to(spec.dtype) if t.dtype != _E8M0 else t.float().to(spec.dtype)
    raise TypeError(f"{what} must have dtype {spec.dtype} ({spec.name}), got {t.dtype}")


#: float16's overflow threshold: |x| >= 65520 rounds to inf (65504 is the largest finite value)
FP16_OVERFLOW = 65520.0


def check_range(dtype: torch.dtype, t: torch.Tensor, what: str) -> None:
    """``ValueError`` where converting ``t`` to ``dtype`` (float16 only; the other float dtypes hold float32's range)
    would turn a finite value into inf (round 57's fp16 trial: a weight of 1e5 loaded as inf, and every token routed
    to its expert came out non-finite); an inf given stays the caller's. Skipped where values cannot be read (meta)."""
    if dtype != torch.float16 or t.dtype in (torch.float16, _E8M0) or not t.is_floating_point() \
            or not values_checkable(t):
        return
    big = t.abs() >= FP16_OVERFLOW
    if bool(big.any()):
        over = big & torch.isfinite(t)
        if bool(over.any()):
            worst = float(t[over].abs().max())
            raise ValueError(f"{what} holds {int(over.sum())} finite values outside float16's range (|x| up to "
                             f"{worst:.4g} > 65504): they would be stored as inf; rescale them or use "
                             "params_dtype=torch.bfloat16")


def fit(spec: ExpertTensor, t: torch.Tensor, what: str) -> torch.Tensor:
    """Check one full shard's shape (size-1 dims may differ: ``[N, 1]`` stands for ``[N]``)."""
    want = spec.shard_shape
    if tuple(t.shape) != want:
        if t.numel() == math.prod(want) and [d for d in t.shape if d != 1] == [d for d in want if d != 1]:
            return t.reshape(want)  # e.g. compressed-tensors' per-channel scale [N, 1], per-tensor [1]
        raise ValueError(f"{what} has shape {list(t.shape)}, expected {list(want)}")
    return t


def keep_dtypes(fn):
    """``nn.Module._apply`` function that moves a tensor as ``fn`` would but keeps its dtype.

    ``Module.half()`` / ``.to(dtype)`` convert every floating tensor, float8 included: e4m3 codes would
    become fp16 and fp32 scales be rounded. Quantised modules keep their storage dtypes (a quantised
    :class:`~moekit.experts.routed.RoutedExperts` moves its ``params_dtype`` and biases itself); ``fn`` is probed
    on an empty tensor, so no converted copy of a large weight is ever made."""

    def apply(t: torch.Tensor) -> torch.Tensor:
        probe = fn(t.new_empty(0))
        return fn(t) if probe.dtype == t.dtype else t.to(device=probe.device)

    return apply


def full_precision(t) -> bool:
    """``t`` is a full-precision float tensor (one a quantised layer quantises on load)."""
    return isinstance(t, torch.Tensor) and t.dtype in FLOAT_DTYPES


def expect_float(name: str, t, shape: tuple) -> None:
    """``t`` must be a full-precision float tensor of ``shape``; else ``TypeError`` / ``ValueError`` naming it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a full-precision float tensor ({[str(d) for d in FLOAT_DTYPES]}), "
                        f"got {t.dtype}; quantised weights need a layer built with quant_config")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")


def check_scale_values(name: str, t) -> None:
    """Scales of a quantised layer (at load, a host read): float ones finite and >= 0 (a dequantisation multiplier is
    never negative; 0 is kept: an all-zero block), input scales (static fp8) > 0 (a zero input scale would make every
    forward NaN, with no error); e8m0 bytes (uint8, mxfp4) are exponents, 255 is OCP MX's NaN (round 49: it loaded,
    and every token routed to that expert came out NaN). ``torch.float8_e8m0fnu`` scales are the same bytes (CPU torch
    has no comparison op for that dtype): checked as uint8."""
    if not isinstance(t, torch.Tensor) or not values_checkable(t) or not t.numel():
        return
    if _E8M0 is not None and t.dtype == _E8M0:
        t = t.view(torch.uint8)
    if t.dtype == torch.uint8:
        if bool((t == 255).any()):
            raise ValueError(f"{name} holds the e8m0 byte 255, which is NaN in OCP MX (scales are 2^(byte - 127) for "
                             "bytes 0..254)")
        return
    if not t.is_floating_point():
        return
    if t.dtype not in FLOAT_DTYPES:  # (round 61: an fp8 scale raised torch's NotImplementedError from the checks)
        raise TypeError(f"{name} has dtype {t.dtype}; scales are float32 / bf16 / fp16 (e8m0 or uint8 exponents "
                        "for mxfp4)")
    check_finite(name, t)
    if "input_scale" in name and not bool((t > 0).all()):
        raise ValueError(f"{name} must be > 0 (a static input scale divides the input), got min {float(t.min())}")
    if not bool((t >= 0).all()):
        raise ValueError(f"{name} must be >= 0 (dequantisation multipliers), got min {float(t.min())}")


def unset_input_scale(spec: ExpertTensor, t) -> bool:
    """A static input scale that is all zero: the value of a layer never given one (a state dict of an unloaded
    layer), read as "not given" (the forward then says it is missing) rather than as a zero scale."""
    return spec.kind == "input_scale" and isinstance(t, torch.Tensor) and values_checkable(t) and not bool(t.any())


#: the e8m0 byte a never-written mxfp4 scale holds: OCP MX's NaN, refused in every scale given (round 62: byte 0,
#: the mark before, is the valid scale 2^-127 that quantisers write for an all-zero block)
UNSET_E8M0 = 255


def unset_value(spec, quantised: bool) -> float:
    """What an expert tensor holds until written: NaN in an unquantised layer's weights and in float scales, the e8m0
    byte 255 in mxfp4 scales (values no scale given may hold: :func:`~.params.check_scale_values`), 0 elsewhere
    (codes, biases, input scales: an input scale must be > 0). A state dict's slice still holding it reads as never
    written (:func:`unset_slices`). Round 62: scales were 0, a valid value (an all-zero expert's fp8 scale, byte 0 of
    e8m0), so a layer holding one could not be restored from its own state dict."""
    if spec.kind == "weight" and not quantised:
        return float("nan")
    if spec.kind == "scale":
        return UNSET_E8M0 if spec.dtype == torch.uint8 else float("nan")
    return 0


def unset_mask(spec, t, quantised: bool, legacy: bool = False):
    """``[slots, shards]`` bool: which shards of ``t`` hold :func:`unset_value` in every element (None where not
    checked: codes, biases, input scales, tensors on meta or under capture). ``legacy``: a state dict saved before
    round 62 (version 1), whose never-written scales hold 0 (all-zero scale shards read as unset, the old rule)."""
    weight = spec.kind == "weight" and not quantised
    if not (weight or spec.kind == "scale") or not isinstance(t, torch.Tensor) or not values_checkable(t) or \
            t.dim() < 1:
        return None
    if not t.shape[0]:
        return t.new_zeros((0, len(spec.shards)), dtype=torch.bool)
    if legacy and spec.kind == "scale":
        return t.contiguous().view(torch.uint8).reshape(t.shape[0], len(spec.shards), -1).any(-1).logical_not()
    if t.dtype == torch.uint8:
        return (t == UNSET_E8M0).reshape(t.shape[0], len(spec.shards), -1).all(-1)
    if not t.is_floating_point():  # (e8m0 dtypes arrive as uint8 views; anything else holds no unset mark)
        return None
    # slot by slot: a bool temporary of the whole stack is ~1 GB for Mixtral's w13 (review of round 56)
    return torch.stack([t[i].isnan().reshape(len(spec.shards), -1).all(-1) for i in range(t.shape[0])])


def check_state_tensors(experts, state_dict: dict, prefix: str, assign: bool = False) -> None:
    """What ``load_state_dict`` brings a quantised layer, checked before anything is copied, as its other loads check
    it (round 53: a state dict loaded anything): codes and e8m0 scales in their storage dtype, by :func:`stored`'s rule
    (int8, e8m0 and fp4x2 bytes are taken as uint8: the entry is replaced by its view, since ``copy_`` would convert
    values; a float weight of a quantised layer's shape is a ``TypeError``: it was rounded to e4m3 without a scale),
    and the values of the scales (:func:`check_scale_values`: ``ValueError``; an all-zero input scale is "not given",
    :func:`unset_input_scale`). ``state_dict`` is the loader's own copy (``Module.load_state_dict`` makes one).
    float16 layers: weights and biases within float16's range (:func:`check_range`). ``assign``
    (``load_state_dict(assign=True)``): the dtypes the layer would hold after it, :func:`check_assigned_dtypes`."""
    specs, quant = experts.specs, experts.quant
    if assign:
        check_assigned_dtypes(experts, state_dict, prefix)
    for name, spec in specs.items():
        t = state_dict.get(prefix + name)
        if isinstance(t, torch.Tensor):
            check_range(spec.dtype, t, f"state dict entry {prefix + name!r}")
    if quant is None:
        return
    for name, spec in specs.items():
        key, t = prefix + name, state_dict.get(prefix + name)
        if not isinstance(t, torch.Tensor) or spec.kind == "bias" or unset_input_scale(spec, t):
            continue
        if spec.dtype not in FLOAT_DTYPES:
            state_dict[key] = t = stored(spec, t, f"state dict entry {key!r} ({quant.name} layer)")
        if spec.kind != "weight":  # (the shards of a never-loaded layer hold the unset mark: not checked)
            unset = unset_mask(spec, t, True) if spec.kind == "scale" else None
            if unset is not None and bool(unset.any()):
                t = t.reshape(*unset.shape, -1)[~unset]
            check_scale_values(f"state dict entry {key!r}", t)


def check_assigned_dtypes(experts, state_dict: dict, prefix: str) -> None:
    """``TypeError`` before an assigning load (``load_state_dict(assign=True)`` keeps the given tensors, unconverted)
    that would leave the layer with dtypes its forward cannot run (round 63: accepted, then the forward failed deep
    in torch): an unquantised layer's weights and biases one float dtype, given or kept; a quantised layer's biases
    in its ``params_dtype`` (a load without ``assign`` converts them)."""
    quantised = experts.quant is not None
    floats = [n for n, spec in experts.specs.items() if not quantised and spec.kind in ("weight", "bias")
              or quantised and spec.kind == "bias"]
    dtypes = {}
    for name in floats:
        t = state_dict.get(prefix + name)
        dtypes[name] = t.dtype if isinstance(t, torch.Tensor) else getattr(experts, name).dtype
    want = experts.params_dtype if quantised else dtypes.get("w13_weight")
    for name, dtype in dtypes.items():
        if dtype not in FLOAT_DTYPES or dtype != want:
            given = "given" if prefix + name in state_dict else "kept"
            why = "not a float dtype" if dtype not in FLOAT_DTYPES else \
                f"but the layer's {'params_dtype' if quantised else 'w13_weight'} would be {want}"
            raise TypeError(f"load_state_dict(assign=True): state dict entry {prefix + name!r} ({given}) is {dtype}, "
                            f"{why}; an assigning load keeps tensors as given, so give every expert weight and bias "
                            f"one float dtype (a load without assign=True converts them)")


#: what a wrong shape given to ``load_expert_weights`` is told (a TP or EP rank's share is a common mistake)
GLOBAL_HINT = ("; load_expert_weights takes the global tensors (every expert, the full intermediate size I), and each "
               "rank takes its own share from them")


def global_stacks(c, fmt: WeightFormat | None, w13, w2, w13_bias=None, w2_bias=None, **scales) -> dict:
    """The checked global ``[E, ...]`` tensors of ``RoutedExperts.load_expert_weights`` by parameter name (``c``: the
    layer's :class:`~moekit.MoEConfig`): unquantised float w13 / w2; quantised ones with their scales, or float ones
    quantised here with :func:`moekit.quantize_experts`; biases only with ``has_bias`` (then both). ``ValueError`` /
    ``TypeError`` naming what is wrong."""
    e, h, inter = c.num_experts, c.hidden_size, c.intermediate_size
    if fmt is None:
        given = [n for n, t in scales.items() if t is not None]
        if given:
            raise ValueError(f"{given} given but the layer is not quantised (quant_config=None)")
        expect_float("w13", w13, (e, c.w13_rows(inter), h))
        expect_float("w2", w2, (e, h, inter))
    else:
        if full_precision(w13) and scales["w13_scale"] is None and scales["w2_scale"] is None:
            expect_float("w13", w13, (e, c.w13_rows(inter), h))
            expect_float("w2", w2, (e, h, inter))
            w13, w2, scales["w13_scale"], scales["w2_scale"] = quantize_experts(w13, w2, fmt)
        for name in ("w13_scale", "w2_scale"):  # e8m0 scales (SPEC §8) as a shard load takes them (``stored``)
            t = scales[name]
            if _E8M0 is not None and isinstance(t, torch.Tensor) and t.dtype == _E8M0:
                scales[name] = t.view(torch.uint8) if fmt.scale_dtype == torch.uint8 else t.float()
        # each tensor against the layer's own sizes (round 56: they were read from w2, so a wrong w2 blamed w13)
        check_quant_weights(fmt, w13, w2, **scales, sizes=(e, inter, h, c.gated), hint=GLOBAL_HINT)
        for name, t in scales.items():
            check_scale_values(name, t)
    if (w13_bias is not None or w2_bias is not None) and not c.has_bias:
        raise ValueError("w13_bias/w2_bias given but the layer was built with has_bias=False")
    if c.has_bias:
        if w13_bias is None or w2_bias is None:
            raise ValueError("the layer has has_bias=True: pass both w13_bias [E, 2I] and w2_bias [E, H]")
        expect_float("w13_bias", w13_bias, (e, c.w13_rows(inter)))
        expect_float("w2_bias", w2_bias, (e, h))
    out = dict(w13_weight=w13, w2_weight=w2, w13_bias=w13_bias, w2_bias=w2_bias, **scales)
    for name in ("w13_weight", "w2_weight", "w13_bias", "w2_bias"):  # every range before any write: never half-loaded
        if isinstance(out[name], torch.Tensor) and (fmt is None or name.endswith("bias")):
            check_range(c.params_dtype, out[name], name.removesuffix("_weight"))
    return out
