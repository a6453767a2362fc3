"""RoutedExperts: the stacked expert weights of one rank and the call into ``fused_experts``.

Weights (``E_local`` experts, ``I_local = I / tp_size``):
    w13_weight: [E_local, 2·I_local, H]  gate rows, then up rows (``I_local`` rows for relu2)
    w2_weight:  [E_local, H, I_local]
    w13_bias:   [E_local, 2·I_local]      (has_bias)
    w2_bias:    [E_local, H]              (has_bias; added on one TP rank only)
Experts consume routing (weights and ids), never logits.
"""

from __future__ import annotations

import math

import torch

from ..config import MoEConfig
from ..ops.api import fused_experts
from ..parallel.placement import ExpertPlacement

SHARD_IDS = ("w1", "w2", "w3")


class RoutedExperts(torch.nn.Module):
    def __init__(
        self,
        layer_name: str,
        params_dtype: torch.dtype,
        moe_config: MoEConfig,
        quant_config=None,
        *,
        placement: ExpertPlacement | None = None,
        expert_mapping: list[tuple[str, str, int, str]] | None = None,
        backend: str = "torch",
        kernels=None,
        device=None,
    ):
        super().__init__()
        if quant_config is not None:
            raise NotImplementedError(f"quant_config={quant_config!r}: quantised experts are not supported yet")
        self.layer_name = layer_name
        self.moe_config = moe_config
        self.placement = placement or ExpertPlacement.single(moe_config.num_experts)
        self.expert_mapping = expert_mapping
        self.backend = kernels.name if kernels is not None else backend
        p, c = self.placement, moe_config
        self.tp_rows = p.tp_slice(c.intermediate_size)
        inter = self.tp_rows.stop - self.tp_rows.start
        self.inter_local = inter
        e = p.num_local
        kw = dict(dtype=params_dtype, device=device)
        self.w13_weight = torch.nn.Parameter(torch.empty(e, c.w13_rows(inter), c.hidden_size, **kw), requires_grad=False)
        self.w2_weight = torch.nn.Parameter(torch.empty(e, c.hidden_size, inter, **kw), requires_grad=False)
        if c.has_bias:
            self.w13_bias = torch.nn.Parameter(torch.zeros(e, c.w13_rows(inter), **kw), requires_grad=False)
            self.w2_bias = torch.nn.Parameter(torch.zeros(e, c.hidden_size, **kw), requires_grad=False)
        else:
            self.w13_bias = None
            self.w2_bias = None
        # default init as nn.Linear does, so an unloaded layer computes finite numbers
        torch.nn.init.uniform_(self.w13_weight, -1 / math.sqrt(c.hidden_size), 1 / math.sqrt(c.hidden_size))
        torch.nn.init.uniform_(self.w2_weight, -1 / math.sqrt(c.intermediate_size), 1 / math.sqrt(c.intermediate_size))
        expert_map = None if p.ep_size == 1 and p.num_physical == p.num_local else p.expert_map(device)
        self.register_buffer("expert_map", expert_map, persistent=False)

    @property
    def add_w2_bias(self) -> bool:
        """The w2 bias is added once across tensor-parallel ranks: on TP rank 0."""
        return self.w2_bias is not None and self.placement.tp_rank == 0

    def forward(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """hidden_states: [T, H]; topk_weights: [T, K] float32; topk_ids: [T, K] int32 -> [T, H]."""
        c = self.moe_config
        return fused_experts(
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
            backend=self.backend,
        )

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
        for name, t in (("w13", w13), ("w2", w2), ("w13_bias", w13_bias), ("w2_bias", w2_bias)):
            if t is not None and not t.is_floating_point():
                raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
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
        inter, h = c.intermediate_size, c.hidden_size
        if shard_id == "w3" and not c.gated:
            raise ValueError(f"shard 'w3' (up projection) does not exist for non-gated activation {c.activation!r}")
        if bias:
            param = self.w2_bias if shard_id == "w2" else self.w13_bias
            if param is None:
                raise ValueError(f"a bias for shard {shard_id!r} was given but the layer has has_bias=False")
            expected = (h,) if shard_id == "w2" else (inter,)
        else:
            param = self.w2_weight if shard_id == "w2" else self.w13_weight
            expected = (h, inter) if shard_id == "w2" else (inter, h)
        _expect(f"expert {logical_id} {shard_id}{' bias' if bias else ''}", tensor, expected)
        rows = self.tp_rows
        n = rows.stop - rows.start
        written = 0
        for slot, logical in enumerate(self.placement.local_logical_ids()):
            if logical != logical_id:
                continue
            if shard_id == "w2":
                param[slot].copy_(tensor if bias else tensor[:, rows])
            else:
                offset = 0 if shard_id == "w1" else n
                param[slot].narrow(0, offset, n).copy_(tensor[rows])
            written += 1
        return written


def _expect(name: str, t, shape: tuple) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
