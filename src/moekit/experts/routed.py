"""RoutedExperts: the stacked expert weights of one rank, their loading, and the call into the kernels.

    out[t] = Σ_k w[t, k] · (w2[e] · act(w13[e] · x[t] + b13[e]) + b2[e]),   e = slot of ids[t, k]

Weights (``E_local`` experts, ``I_local = I / tp_size``; the layout of :mod:`moekit.experts.layout`):
    w13_weight: [E_local, 2·I_local, H] dtype   gate rows, then up rows (``I_local`` rows for relu2)
    w2_weight:  [E_local, H, I_local] dtype
    w13_bias:   [E_local, 2·I_local] dtype      (has_bias)
    w2_bias:    [E_local, H] dtype              (has_bias; added on TP rank 0 only)

The weights are allocated uninitialised; every write (:meth:`load_expert_weights`,
:meth:`load_expert_shard`, :meth:`adopt_weights`, ``load_state_dict``) is recorded per local slot and
shard, and a forward before every shard was written raises ``RuntimeError`` naming what is missing.
The :class:`~moekit.experts.placement.ExpertPlacement` lives here and nowhere else; an EPLB rebalance
changes it through :meth:`set_physical_to_logical`. Experts consume routing, never logits.
"""

from __future__ import annotations

import torch

from .._checks import KERNEL_DTYPES
from ..config import MoEConfig
from ..ops.kernels import kernels_for
from .layout import DOWN, GATE, SHARD_IDS, UP, shards
from .placement import ExpertPlacement

#: parameter -> the shards it holds
_PARAM_SHARDS = {"w13_weight": (GATE, UP), "w2_weight": (DOWN,), "w13_bias": (GATE, UP), "w2_bias": (DOWN,)}


class RoutedExperts(torch.nn.Module):
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
        if quant_config is not None:
            raise NotImplementedError(f"quant_config={quant_config!r}: quantised experts are not supported yet")
        self.layer_name = layer_name
        self.moe_config = moe_config
        self.placement = placement or ExpertPlacement.single(moe_config.num_experts)
        self.kernels = kernels if kernels is not None else kernels_for("torch")
        if self.kernels.name == "triton" and params_dtype not in KERNEL_DTYPES:
            raise TypeError(
                f"params_dtype={params_dtype} cannot run on the triton backend; expected one of "
                f"{[str(d) for d in KERNEL_DTYPES]} (float64 is for the torch reference backend)"
            )
        if expert_output_norm is not None and self.kernels.name != "torch":
            raise NotImplementedError(
                f"expert_output_norm on the {self.kernels.name!r} backend: the per-expert output norm is not in "
                "the w2 epilogue of the Triton kernels; use backend='torch'"
            )
        #: applied to every expert's output rows before the routing weight (torch backend)
        self.expert_output_norm = expert_output_norm
        p, c = self.placement, moe_config
        self.tp_rows = p.tp_slice(c.intermediate_size)
        self.inter_local = self.tp_rows.stop - self.tp_rows.start
        e, rows, h = p.num_local, c.w13_rows(self.inter_local), c.hidden_size
        kw = dict(dtype=params_dtype, device=device)
        self.w13_weight = _param(torch.empty(e, rows, h, **kw))
        self.w2_weight = _param(torch.empty(e, h, self.inter_local, **kw))
        self.w13_bias = _param(torch.empty(e, rows, **kw)) if c.has_bias else None
        self.w2_bias = _param(torch.empty(e, h, **kw)) if c.has_bias else None
        expert_map = None if p.ep_size == 1 and p.num_physical == p.num_local else p.expert_map(device)
        self.register_buffer("expert_map", expert_map, persistent=False)
        # what has been written: (local slot, shard, is_bias)
        self._written: set[tuple[int, str, bool]] = set()
        self._needed = {
            (slot, s, bias)
            for slot in range(e)
            for s in shards(c.gated)
            for bias in ((False, True) if c.has_bias else (False,))
        }
        self._complete = False

    @property
    def backend(self) -> str:
        return self.kernels.name

    @property
    def add_w2_bias(self) -> bool:
        """The w2 bias is added once across tensor-parallel ranks: on TP rank 0."""
        return self.w2_bias is not None and self.placement.tp_rank == 0

    def forward(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """hidden_states: [T, H] dtype; topk_weights: [T, K] float32; topk_ids: [T, K] int32 -> [T, H] dtype."""
        self.check_loaded()
        c = self.moe_config
        # inputs were checked by the layer (x) and at construction (weights): the table only computes
        return self.kernels.experts(
            hidden_states,
            self.w13_weight,
            self.w2_weight,
            topk_weights,
            topk_ids,
            activation=c.activation,
            apply_router_weight_on_input=c.apply_router_weight_on_input,
            w1_bias=self.w13_bias,
            w2_bias=self.w2_bias if self.add_w2_bias else None,
            expert_map=self.expert_map,
            swiglu_limit=c.swiglu_limit,
            **({} if self.expert_output_norm is None else {"expert_output_fn": self.expert_output_norm}),
        )

    # -- the loaded-record --------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        """True once every shard of every local slot has been written."""
        return self._complete

    def missing(self) -> list[str]:
        """What is still unwritten, by logical expert: ``["expert 3 w2", "expert 0 w1 bias", ...]``."""
        logical = self.placement.local_logical_ids()
        order = {s: i for i, s in enumerate(shards(self.moe_config.gated))}
        names = {(logical[slot], order[s], bias) for slot, s, bias in self._needed - self._written}
        by_order = shards(self.moe_config.gated)
        return [f"expert {e} {by_order[i]}{' bias' if b else ''}" for e, i, b in sorted(names)]

    def check_loaded(self) -> None:
        """Raise ``RuntimeError`` unless every expert weight of this rank was loaded."""
        if self._complete:
            return
        missing = self.missing()
        more = f" and {len(missing) - 6} more" if len(missing) > 6 else ""
        raise RuntimeError(
            f"layer {self.layer_name!r}: forward before the expert weights were loaded (missing "
            f"{', '.join(missing[:6])}{more}); load them with load_expert_weights(), load_weights() "
            "or moekit.load_moe_layers()"
        )

    def _mark(self, slots, shard_ids, bias: bool) -> None:
        self._written.update((slot, s, bias) for slot in slots for s in shard_ids)
        self._complete = self._needed <= self._written

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        for name, shard_ids in _PARAM_SHARDS.items():
            if prefix + name in state_dict and getattr(self, name) is not None:
                self._mark(range(self.placement.num_local), shard_ids, name.endswith("bias"))

    # -- loading ------------------------------------------------------------------------------
    @torch.no_grad()
    def load_expert_weights(
        self,
        w13: torch.Tensor,
        w2: torch.Tensor,
        w13_bias: torch.Tensor | None = None,
        w2_bias: torch.Tensor | None = None,
    ) -> None:
        """Copy this rank's share out of the global tensors.

        w13: [E, 2I, H] (gate rows then up rows; [E, I, H] for relu2); w2: [E, H, I];
        w13_bias: [E, 2I]; w2_bias: [E, H]. Replicas and the TP slice of I are taken here.
        """
        c = self.moe_config
        e, h, inter = c.num_experts, c.hidden_size, c.intermediate_size
        _expect("w13", w13, (e, c.w13_rows(inter), h))
        _expect("w2", w2, (e, h, inter))
        if (w13_bias is not None or w2_bias is not None) and not c.has_bias:
            raise ValueError("w13_bias/w2_bias given but the layer was built with has_bias=False")
        if c.has_bias:
            if w13_bias is None or w2_bias is None:
                raise ValueError("the layer has has_bias=True: pass both w13_bias [E, 2I] and w2_bias [E, H]")
            _expect("w13_bias", w13_bias, (e, c.w13_rows(inter)))
            _expect("w2_bias", w2_bias, (e, h))
        for slot, logical in enumerate(self.placement.local_logical_ids()):
            self.w13_weight[slot].copy_(self._w13_rows(w13[logical]))
            self.w2_weight[slot].copy_(w2[logical][:, self.tp_rows])
            if c.has_bias:
                self.w13_bias[slot].copy_(self._w13_rows(w13_bias[logical]))
                self.w2_bias[slot].copy_(w2_bias[logical])
        every = range(self.placement.num_local)
        self._mark(every, shards(c.gated), False)
        if c.has_bias:
            self._mark(every, shards(c.gated), True)

    def _w13_rows(self, full: torch.Tensor) -> torch.Tensor:
        """This TP rank's rows of one expert's w13 ([2I, ...]: gate slice then up slice; [I, ...] for relu2)."""
        rows = self.tp_rows
        if not self.moe_config.gated:
            return full[rows]
        inter = self.moe_config.intermediate_size
        return torch.cat([full[rows], full[inter + rows.start : inter + rows.stop]])

    @torch.no_grad()
    def load_expert_shard(self, logical_id: int, shard_id: str, tensor: torch.Tensor, *, bias: bool = False) -> int:
        """Load one checkpoint tensor of one logical expert into every local slot holding it.

        shard_id "w1" (gate, [I, H]), "w3" (up, [I, H]) or "w2" (down, [H, I]); with ``bias`` the
        tensors are [I], [I] and [H]. Tensors are full-size: the TP slice is taken here.
        Returns how many local slots were written (0 when another rank holds the expert).
        """
        if shard_id not in SHARD_IDS:
            raise ValueError(f"shard_id must be one of {list(SHARD_IDS)}, got {shard_id!r}")
        c = self.moe_config
        if shard_id == UP and not c.gated:
            raise ValueError(f"shard 'w3' (up projection) does not exist for non-gated activation {c.activation!r}")
        param = self._shard_param(shard_id, bias)
        _expect(f"expert {logical_id} {shard_id}{' bias' if bias else ''}", tensor, self.shard_shape(shard_id, bias))
        rows, n = self.tp_rows, self.inter_local
        slots = [s for s, logical in enumerate(self.placement.local_logical_ids()) if logical == logical_id]
        for slot in slots:
            if shard_id == DOWN:
                param[slot].copy_(tensor if bias else tensor[:, rows])
            else:
                param[slot].narrow(0, 0 if shard_id == GATE else n, n).copy_(tensor[rows])
        self._mark(slots, (shard_id,), bias)
        return len(slots)

    def shard_shape(self, shard_id: str, bias: bool = False) -> tuple[int, ...]:
        """Full (unsliced) shape of one expert's shard: gate/up [I, H] (bias [I]), down [H, I] (bias [H])."""
        h, inter = self.moe_config.hidden_size, self.moe_config.intermediate_size
        if shard_id == DOWN:
            return (h,) if bias else (h, inter)
        return (inter,) if bias else (inter, h)

    def _shard_param(self, shard_id: str, bias: bool) -> torch.Tensor:
        param = (self.w2_bias if shard_id == DOWN else self.w13_bias) if bias else (
            self.w2_weight if shard_id == DOWN else self.w13_weight
        )
        if param is None:
            raise ValueError(f"a bias for shard {shard_id!r} was given but the layer has has_bias=False")
        return param

    @torch.no_grad()
    def adopt_weights(self, w13, w2, w13_bias=None, w2_bias=None) -> None:
        """Use these local tensors as the weights, without a copy (e.g. a transformers block's own).

        w13: [E_local, 2·I_local, H]; w2: [E_local, H, I_local]; biases as the parameters. A
        ``torch.nn.Parameter`` is kept as it is (shared with its module); a tensor is wrapped."""
        c = self.moe_config
        for name, t in (("w13_weight", w13), ("w2_weight", w2), ("w13_bias", w13_bias), ("w2_bias", w2_bias)):
            old = getattr(self, name)
            if (t is None) != (old is None):
                got = "no tensor" if t is None else "a tensor"
                raise ValueError(f"{name}: the layer has has_bias={c.has_bias}, got {got}")
            if t is None:
                continue
            _expect(name, t, tuple(old.shape))
            if t.dtype != old.dtype:
                raise TypeError(f"{name} must have dtype {old.dtype}, got {t.dtype}")
            setattr(self, name, t if isinstance(t, torch.nn.Parameter) else _param(t))
            self._mark(range(self.placement.num_local), _PARAM_SHARDS[name], name.endswith("bias"))

    # -- placement ----------------------------------------------------------------------------
    def set_physical_to_logical(self, physical_to_logical) -> ExpertPlacement:
        """EPLB: the same slots now hold other logical experts (the caller moved the weights)."""
        self.placement = self.placement.with_physical_to_logical(physical_to_logical)
        return self.placement

    def extra_repr(self) -> str:
        p = self.placement
        return f"E_local={p.num_local}, I_local={self.inter_local}, backend={self.backend!r}, loaded={self._complete}"


def _param(t: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(t, requires_grad=False)


def _expect(name: str, t, shape: tuple) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
