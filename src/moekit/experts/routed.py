"""RoutedExperts: the stacked expert weights of one rank, their loading, and the call into the kernels.

    out[t] = Σ_k w[t, k] · (w2[e] · act(w13[e] · x[t] + b13[e]) + b2[e]),   e = slot of ids[t, k]

Weights (``E_local`` experts, ``I_local = I / tp_size``; the layout of :mod:`moekit.experts.layout`):
    w13_weight: [E_local, 2·I_local, H] dtype   gate rows, then up rows (``I_local`` rows for relu2)
    w2_weight:  [E_local, H, I_local] dtype
    w13_bias:   [E_local, 2·I_local] dtype      (has_bias)
    w2_bias:    [E_local, H] dtype              (has_bias; added on TP rank 0 only)

Quantised layers (``moe_config.quant_config``, SPEC §8; ``fmt = self.quant``) hold the same names in the format's
storage (``fmt.w13_shape`` ... at ``E_local, I_local``) plus
    w13_scale, w2_scale:              ``fmt.w13_scale_shape`` / ``fmt.w2_scale_shape`` (float32: fp8, int4; e8m0: mxfp4)
    w13_input_scale, w2_input_scale:  [E_local] float32 (static fp8 inputs only; every slot holds the largest scale
                                      over all experts, the value the math uses)
``params_dtype`` stays the dtype of activations, biases and outputs. :meth:`expert_tensors` lists every per-slot tensor
(what an EPLB move carries); :mod:`moekit.experts.params` says how each is sliced.

The weights are allocated unset (NaN unquantised weights and float scales, e8m0 scales 255, else 0); every write
(:meth:`load_expert_weights`, :meth:`load_expert_shard`, :meth:`adopt_weights`, ``load_state_dict``) is recorded per
local slot, shard and kind (weight, bias, scale, input_scale), and a forward before everything was written raises
``RuntimeError`` naming what is missing. The :class:`~moekit.experts.placement.ExpertPlacement` lives
here and nowhere else; an EPLB rebalance changes it through :meth:`set_physical_to_logical`.
"""

from __future__ import annotations

import torch

from .._checks import KERNEL_DTYPES, check_int
from ..config import MoEConfig
from ..ops.kernels import kernels_for
from ..ops.quant_config import parse_quant_config
from ..ops.quantize import quantize_weight
from ..ops.w4_layout import packed_layout_for
from .adopt import adoptable
from .assigned import check_on_meta, hf_assigned
from .layout import DOWN, SHARD_IDS, UP
from .loaded_record import (InputScales, LoadedRecord, check_swapped_in, fill_unset, state_loaded, swapped_in_whole,
                            unset_value, values_kept, values_sample, writable)
from .output_norm import check_output_norm, normed_experts, norm_ids_map
from .packed import RELAID_WEIGHTS, follow_params_dtype, follow_weight_dtype, relay_loaded, spec_packed_saved
from .params import (KINDS, ExpertTensor, check_range, check_scale_values, check_state_tensors, check_tp_split,
                     expert_tensors_spec, fit, full_precision, global_stacks, keep_dtypes, stored)
from .placement import ExpertPlacement
from .placement_state import incoming_placement, maps_rebuilt, placement_moved, placement_saved, slots_of
from .range16 import cast_dtype_checked, check_named, check_state_dict, pending_pairs, shard_given

class RoutedExperts(torch.nn.Module):
    """The routed experts of one rank: stacked weights, their loading, and the call into the kernel table.

    ``forward(hidden_states [T, H], topk_weights [T, K] float32, topk_ids [T, K] int32) -> [T, H]``
    computes ``Σ_k w[t, k] · (w2[e] · act(w13[e] · x[t] + b13[e]) + b2[e])`` for the experts this rank holds (ids
    it does not hold add 0). :func:`moekit.FusedMoE` builds it (``routed_experts_cls`` selects a subclass).

    Args:
        layer_name: the layer's name, used in messages.
        params_dtype: dtype of the weights (float32, bfloat16, float16; float64 on the torch backend).
        moe_config: the layer's :class:`~moekit.MoEConfig` (sizes, activation, biases, global ``E``).
        quant_config: None (weights in ``params_dtype``); quantised formats are described at
            :func:`moekit.FusedMoE`; one this build cannot run raises ``NotImplementedError``.
        placement: which experts (and which tensor-parallel slice of ``I``) this rank holds, an
            :class:`~moekit.experts.placement.ExpertPlacement`; default: every expert, no TP.
        kernels: the kernel table (:func:`moekit.ops.kernels.resolve_kernels`); default the torch table.
        device: where the weights are allocated (unset, as the class docstring says; ``"meta"`` allocates nothing).
        expert_output_norm: a module applied to each expert's output rows before the routing weight, or
            None: ``[N, H] -> [N, H]`` (Muse Spark), or with ``per_expert = True`` ``(rows, logical expert
            ids [N]) -> rows`` (Ergo); it must map a zero row to zero. Run by :mod:`.output_norm` on every
            backend and format; not with ``apply_router_weight_on_input`` (``ValueError``) or tensor
            parallelism (``NotImplementedError``: a rank's rows would be partial sums).

    Weights (``E_local`` experts, ``I_local = I / tp_size``): ``w13_weight [E_local, 2·I_local, H]``
    (gate rows, then up rows; ``I_local`` rows for relu2), ``w2_weight [E_local, H, I_local]``, and with
    biases ``w13_bias [E_local, 2·I_local]``, ``w2_bias [E_local, H]``. Writes are recorded per slot and shard;
    :attr:`loaded` and :meth:`missing` say what is still unwritten, and a forward before every shard was written
    raises ``RuntimeError``. Every tensor starts unset (NaN unquantised weights and float scales, the e8m0 byte 255
    in mxfp4 scales, else 0), and ``load_state_dict`` reads a slot's shard still unset as unwritten (a state dict of
    a layer never loaded loads as not loaded; an all-zero expert or scale, e.g. padding, is a value: round 62).
    """

    _version = 2  # state dicts: 2 since round 62 (never-written scales NaN / e8m0 255; 1: 0, read as unset on load)

    def __init__(
        self,
        layer_name: str,
        params_dtype: torch.dtype,
        moe_config: MoEConfig,
        quant_config=None,
        *,
        placement: ExpertPlacement | None = None,
        kernels=None,
        device=None,
        expert_output_norm: torch.nn.Module | None = None,
    ):
        super().__init__()
        fmt = parse_quant_config(quant_config)
        if fmt is not None and moe_config.quant_config is not None and fmt != moe_config.quant_config:
            raise ValueError(f"quant_config={fmt} differs from moe_config.quant_config={moe_config.quant_config}")
        self.quant = fmt if fmt is not None else moe_config.quant_config
        self.layer_name = layer_name
        self.moe_config = moe_config
        self._params_dtype = params_dtype
        self.placement = placement or ExpertPlacement.single(moe_config.num_experts)
        self.kernels = kernels if kernels is not None else kernels_for("torch")
        if self.kernels.name == "triton" and params_dtype not in KERNEL_DTYPES:
            raise TypeError(
                f"params_dtype={params_dtype} cannot run on the triton backend; expected one of "
                f"{[str(d) for d in KERNEL_DTYPES]} (float64 is for the torch reference backend)"
            )
        self.kernels.check_supports(self.quant)
        check_output_norm(expert_output_norm, moe_config, self.placement)
        #: applied to every expert's output rows before the routing weight (:mod:`.output_norm`)
        self.expert_output_norm = expert_output_norm
        p, c = self.placement, moe_config
        #: physical -> logical ids [E + R] int64 for a per-expert norm when they differ (EPLB), else None
        self.register_buffer("_norm_p2l", norm_ids_map(self.placement, expert_output_norm, device),
                             persistent=False)
        self.tp_rows = p.tp_slice(c.intermediate_size)
        self.inter_local = self.tp_rows.stop - self.tp_rows.start
        if self.quant is not None:
            check_tp_split(self.quant, c.intermediate_size, p.tp_size)
            self.quant.validate(p.num_local, self.inter_local, c.hidden_size, c.gated)
        self.specs = expert_tensors_spec(c.hidden_size, c.intermediate_size, c.gated, c.has_bias, params_dtype,
                                         self.quant)
        #: how packed 4-bit words are stored: "spec" (SPEC §8), or "rega" (re-laid for the register-operand GEMMs,
        #: :mod:`moekit.ops.w4_layout`: 3-14 % faster 4-bit steps on the H200) where the kernel table reads it and
        #: the sizes allow; state dicts always hold SPEC §8's packing (converted on save and load)
        self.packed_layout = packed_layout_for(self.kernels.packed_layouts, self.quant, params_dtype, c.hidden_size,
                                               self.inter_local)
        for name in ("w13_bias", "w2_bias", "w13_scale", "w2_scale", "w13_input_scale", "w2_input_scale"):
            setattr(self, name, None)
        for name, spec in self.specs.items():
            # unset until given (NaN float weights, else 0): a state dict of an unloaded layer loads again (scales:
            # round 53's review) and loads as not loaded (loaded_record.unset_slices; rounds 55-56)
            setattr(self, name, torch.nn.Parameter(torch.full(spec.local_shape(p.num_local, self.tp_rows), unset_value(
                spec, self.quant is not None), dtype=spec.dtype, device=device), requires_grad=False))
        expert_map = None if p.ep_size == 1 and p.num_physical == p.num_local else p.expert_map(device)
        self.register_buffer("expert_map", expert_map, persistent=False)
        self._record = LoadedRecord((slot, s, spec.kind) for spec in self.specs.values() for s in spec.shards
                                    for slot in range(p.num_local))
        self._input_scales = InputScales()  # each expert's latest static input scale (every slot holds the largest)

    def __setattr__(self, name, value):  # (transformers' from_pretrained assigns what it read: a load, assigned.py)
        if not hf_assigned(self, name, value):
            super().__setattr__(name, value)

    def _apply(self, fn, *args, **kwargs):
        # unquantised weights follow ``.to(dtype)``; quantised ones keep their storage dtypes (``keep_dtypes``) while
        # params_dtype (activations, outputs, biases) follows a float cast, as an unquantised layer's does
        # (float16 4-bit: a dequantised weight past float16's range is refused before anything moves: range16)
        new, sample = cast_dtype_checked(self, fn), values_sample(self)
        out = super()._apply(fn if self.quant is None else keep_dtypes(fn), *args, **kwargs)
        if not self.w13_weight.is_meta and not values_kept(sample, self):  # ``to_empty`` (from meta; round 63: or of
            maps_rebuilt(self)  # values): the maps hold garbage, the expert tensors are unset as at construction (a
            fill_unset(self)  # state dict saved before any load then loads as not loaded; rounds 55-56), none loaded
            self._record.clear()
        if new is not None and new != self._params_dtype:
            follow_params_dtype(self, new)
        follow_weight_dtype(self)  # moe_config.params_dtype, and what loads convert to (unquantised)
        if self.w13_weight.device.type == "meta":  # the values are gone (``.to("meta")``; ``to_empty`` after it
            self._record.clear()                   # leaves uninitialised memory): a forward must not run on them
        return out

    @property
    def params_dtype(self) -> torch.dtype:
        """The dtype of activations and outputs (unquantised: the weights' dtype, which ``.to()`` moves;
        quantised: ``params_dtype`` at construction, then what ``.to(dtype)`` / ``.half()`` make of it, while the
        weights and scales keep their storage dtypes)."""
        return self.w13_weight.dtype if self.quant is None else self._params_dtype

    @property
    def backend(self) -> str:
        return self.kernels.name

    @property
    def add_w2_bias(self) -> bool:
        """The w2 bias is added once across tensor-parallel ranks: on TP rank 0."""
        return self.w2_bias is not None and self.placement.tp_rank == 0

    def expert_tensors(self) -> dict[str, torch.Tensor]:
        """Every per-slot tensor ``[E_local, ...]`` by name (weights, scales, input scales, biases)."""
        return {name: getattr(self, name) for name in self.specs}

    def forward(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """hidden_states: [T, H] params_dtype; topk_weights: [T, K] float32; topk_ids: [T, K] int32 -> [T, H]."""
        check_on_meta(self, hidden_states)
        self.check_loaded()
        if self.expert_output_norm is not None:  # the experts once per slot, the norm, the weighted sum
            return normed_experts(self._experts, self.expert_output_norm, hidden_states, topk_weights, topk_ids,
                                  self._norm_p2l)
        return self._experts(hidden_states, topk_weights, topk_ids)

    def _experts(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        c = self.moe_config
        # inputs were checked by the layer (x) and at construction (weights): the table only computes
        common = dict(activation=c.activation, apply_router_weight_on_input=c.apply_router_weight_on_input,
                      w1_bias=self.w13_bias, w2_bias=self.w2_bias if self.add_w2_bias else None,
                      expert_map=self.expert_map, swiglu_limit=c.swiglu_limit)
        if self.quant is None:
            if not torch.compiler.is_compiling():
                check_swapped_in(self)  # (functional_call / assignments: round 66)
            return self.kernels.experts(hidden_states, self.w13_weight, self.w2_weight, topk_weights, topk_ids,
                                        **common)
        if self.packed_layout != "spec":
            common["packed_layout"] = self.packed_layout
        return self.kernels.experts_quant(
            hidden_states, self.w13_weight, self.w2_weight, topk_weights, topk_ids, fmt=self.quant,
            w13_scale=self.w13_scale, w2_scale=self.w2_scale, w13_input_scale=self.w13_input_scale,
            w2_input_scale=self.w2_input_scale, **common)

    # -- the loaded-record (:class:`.loaded_record.LoadedRecord`) ---------------------------------
    @property
    def loaded(self) -> bool:
        """True once every shard of every local slot has been written."""
        return self._record.complete

    def missing(self) -> list[str]:
        """What is still unwritten, by logical expert: ``["expert 3 w2", "expert 0 w1 bias", ...]``."""
        return self._record.missing(self.placement.local_logical_ids(), self.moe_config.gated)

    def check_loaded(self) -> None:
        """Raise ``RuntimeError`` unless every expert weight of this rank was loaded (one attribute read once loaded)
        or swapped in whole (:func:`~.loaded_record.swapped_in_whole`)."""
        if not self._record.complete and not swapped_in_whole(self):
            self._record.check(self.layer_name, self.placement.local_logical_ids(), self.moe_config.gated)

    def _relaid_weights(self) -> tuple[str, ...]:
        """The weight parameters stored re-laid (``packed_layout == "rega"``), else none."""
        return RELAID_WEIGHTS if self.packed_layout == "rega" else ()

    # state dicts hold SPEC §8's packing (:mod:`.packed`), and, once EPLB moved a slot, which expert each slot holds
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        check_state_tensors(self, state_dict, prefix, local_metadata.get("assign_to_params_buffers", False))
        check_state_dict(self, state_dict, prefix)  # (float16 4-bit layers: pairs, and halves given alone)
        placement = incoming_placement(self, state_dict, prefix)  # shapes and placement, checked before any copy
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        relay_loaded(self, self._relaid_weights(), state_dict, prefix, local_metadata)
        legacy = local_metadata["version"] < 2 if "version" in local_metadata else None  # (None: no metadata; r69)
        state_loaded(self, state_dict, prefix, placement, (unexpected_keys, missing_keys), legacy)  # placement...

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        spec_packed_saved(self._relaid_weights(), destination, prefix)
        placement_saved(self, destination, prefix)

    # -- loading ------------------------------------------------------------------------------
    @torch.no_grad()
    def load_expert_weights(
        self,
        w13: torch.Tensor,
        w2: torch.Tensor,
        w13_bias: torch.Tensor | None = None,
        w2_bias: torch.Tensor | None = None,
        *,
        w13_scale: torch.Tensor | None = None,
        w2_scale: torch.Tensor | None = None,
        w13_input_scale: torch.Tensor | None = None,
        w2_input_scale: torch.Tensor | None = None,
    ) -> None:
        """Copy this rank's share (its slots, its TP slice of I) out of the global tensors.

        Unquantised: w13 [E, 2I, H] (gate rows then up rows; [E, I, H] for relu2); w2 [E, H, I].
        Quantised: the format's global tensors (``fmt.w13_shape(E, I, H)`` ..., as
        :func:`moekit.quantize_experts` returns them) with ``w13_scale`` / ``w2_scale`` (and the
        ``[E]`` input scales of static fp8), or full-precision float w13 / w2 without scales, which are
        quantised here with :func:`moekit.quantize_experts` (static fp8 still needs the input scales).
        w13_bias: [E, 2I]; w2_bias: [E, H] (any float dtype, stored in ``params_dtype``).
        """
        stacks = global_stacks(self.moe_config, self.quant, w13, w2, w13_bias, w2_bias, w13_scale=w13_scale,
                               w2_scale=w2_scale, w13_input_scale=w13_input_scale, w2_input_scale=w2_input_scale)
        check_named(self, stacks)
        if all(p.device.type != "meta" for p in self.parameters()):
            for name, t in stacks.items():
                if isinstance(t, torch.Tensor) and t.device.type == "meta":
                    arg = name.removesuffix("_weight")
                    raise ValueError(f"{arg} is on the meta device (it holds no values); pass it with its values")
        every = range(self.placement.num_local)
        for name, spec in self.specs.items():
            full = stored(spec, stacks[name], name)
            param = writable(self, name)
            if spec.kind == "input_scale":  # the largest over all experts (SPEC §8), in every slot
                param.fill_(self._input_scales.stack(name, full, spec.shards))
            else:
                for slot, logical in enumerate(self.placement.local_logical_ids()):
                    one = full[logical]
                    parts = one.chunk(len(spec.shards)) if len(spec.shards) > 1 else (one,)
                    for s, part in zip(spec.shards, parts):
                        spec.write(param, slot, s, part, self.tp_rows, relay=name in self._relaid_weights())
            self._record.mark(every, spec.shards, spec.kind)

    def _spec(self, shard_id: str, kind: str) -> ExpertTensor:
        if shard_id not in SHARD_IDS:
            raise ValueError(f"shard_id must be one of {list(SHARD_IDS)}, got {shard_id!r}")
        if shard_id == UP and not self.moe_config.gated:
            raise ValueError(f"shard 'w3' (up projection) does not exist for non-gated activation "
                             f"{self.moe_config.activation!r}")
        side = "w2" if shard_id == DOWN else "w13"
        name = {"weight": "weight", "bias": "bias"}.get(kind, kind)
        spec = self.specs.get(f"{side}_{name}")
        if spec is None:
            why = "has_bias=False" if kind == "bias" else f"quant_config={self.quant}"
            raise ValueError(f"a {kind} for shard {shard_id!r} was given but the layer has {why}")
        return spec

    @torch.no_grad()
    def load_expert_shard(self, logical_id: int, shard_id: str, tensor: torch.Tensor, *, bias: bool = False,
                          kind: str | None = None) -> int:
        """Load one checkpoint tensor of one logical expert into every local slot holding it.

        shard_id "w1" (gate), "w3" (up) or "w2" (down); ``kind`` "weight" (default), "bias" (or
        ``bias=True``), "scale" or "input_scale". Shapes are one full shard (:mod:`.params`): weights
        gate/up [I, H] and down [H, I] (quantised: the format's storage, e.g. [I, H/2] uint8 mxfp4),
        biases [I] / [H]. A quantised layer given a full-precision float weight quantises it here
        (:func:`moekit.ops.quantize.quantize_weight`) and writes its scale too. The TP slice is taken
        here. Returns how many local slots were written (0 when another rank holds the expert).
        """
        kind = kind or ("bias" if bias else "weight")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
        check_int("logical_id", logical_id, minimum=0, maximum=self.moe_config.num_experts - 1)
        what = f"expert {logical_id} {shard_id} {kind}"
        spec = self._spec(shard_id, kind)
        slots = slots_of(self, logical_id)
        if kind in ("scale", "input_scale"):
            check_scale_values(what, tensor)
        if kind == "input_scale":  # in every slot: the largest of each expert's latest one
            value = float(fit(spec, stored(spec, tensor, what), what))
            writable(self, spec.name).fill_(self._input_scales.given(spec.name, {(logical_id, shard_id): value}))
            self._record.mark(slots, (shard_id,), kind)
            return len(slots)
        if kind == "weight" and self.quant is not None and full_precision(tensor):
            shape = self.shard_shape(shard_id)
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{what} has shape {list(tensor.shape)}, expected {list(shape)} (full precision)")
            if not slots:  # another rank's expert (EP): checked, not quantised (a fused stack reaches every rank)
                return 0
            tensor, scale = quantize_weight(tensor, self.quant)
            pending_pairs(self).keep(self, logical_id, shard_id, tensor, scale, what)  # (float16 4-bit: the pair)
            self.load_expert_shard(logical_id, shard_id, scale, kind="scale")
        check_range(spec.dtype, tensor, what)  # (load_expert_weights: global_stacks checks the whole stacks first)
        part = fit(spec, stored(spec, tensor, what), what)
        shard_given(self, logical_id, shard_id, kind, part, slots, what)  # (float16 4-bit: with its other half)
        for slot in slots:
            spec.write(writable(self, spec.name), slot, shard_id, part, self.tp_rows,
                       relay=spec.name in self._relaid_weights())
        self._record.mark(slots, (shard_id,), kind)
        return len(slots)

    def shard_shape(self, shard_id: str, bias: bool = False) -> tuple[int, ...]:
        """Full-precision (unsliced) shape of one expert's shard: gate/up [I, H] (bias [I]), down [H, I]
        (bias [H])."""
        h, inter = self.moe_config.hidden_size, self.moe_config.intermediate_size
        if shard_id == DOWN:
            return (h,) if bias else (h, inter)
        return (inter,) if bias else (inter, h)

    @torch.no_grad()
    def adopt_weights(self, w13, w2, w13_bias=None, w2_bias=None, **scales) -> None:
        """Use these local tensors as the weights, without a copy (e.g. a transformers block's own).

        w13: [E_local, 2·I_local, H]; w2: [E_local, H, I_local]; biases and (quantised layers) the
        scales by name (``w13_scale=``, ...) shaped and typed as the parameters. A
        ``torch.nn.Parameter`` is kept as it is (shared with its module); a tensor is wrapped. Packed 4-bit
        weights are taken in SPEC §8's packing and used so (``packed_layout`` becomes ``"spec"``: re-laying them
        would change the owner's tensors). Everything is checked before the first tensor is adopted (:mod:`.adopt`;
        a float16 weight-only 4-bit layer: ``ValueError`` where a dequantised weight passes float16's range)."""
        given = adoptable(self, dict(scales, w13_weight=w13, w2_weight=w2, w13_bias=w13_bias, w2_bias=w2_bias))
        for name, spec in self.specs.items():
            t = given[name]
            setattr(self, name, t if isinstance(t, torch.nn.Parameter) else torch.nn.Parameter(t, requires_grad=False))
            self._record.mark(range(self.placement.num_local), spec.shards, spec.kind)
        self._input_scales.seed(self, self.specs)
        self.packed_layout = "spec"

    # -- placement ----------------------------------------------------------------------------
    def set_physical_to_logical(self, physical_to_logical) -> ExpertPlacement:
        """EPLB: the same slots now hold other logical experts (the caller moved the weights)."""
        self.placement = self.placement.with_physical_to_logical(physical_to_logical)
        placement_moved(self)  # (a state dict given the placement follows it, as it follows the moved weights)
        self._norm_p2l = norm_ids_map(self.placement, self.expert_output_norm, self.w13_weight.device, self._norm_p2l)
        return self.placement

    def extra_repr(self) -> str:
        quant = (f", quant={self.quant.name!r}" if self.quant is not None else "") + \
            (f", packed_layout={self.packed_layout!r}" if self.packed_layout != "spec" else "")
        return (f"E_local={self.placement.num_local}, I_local={self.inter_local}, backend={self.backend!r}{quant}, "
                f"loaded={self.loaded}")
