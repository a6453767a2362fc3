"""transformers integration: swap a loaded model's MoE blocks for moekit layers, or register moekit as
an experts implementation (``from_pretrained(..., experts_implementation="moekit")``).

transformers is imported inside the functions only: ``import moekit`` never needs it.

- :func:`patch` replaces every MoE block with :class:`MoEBlockAdapter` around a moekit layer (where the
  MoE is made of decoder-layer attributes, Gemma 4, the layer's ``experts`` becomes a
  :class:`LayerMoEAdapter`). The moekit layer is built from the plan as the loader builds it, then adopts
  every tensor of the block under the spec's renames: router, expert, shared-expert and transform weights
  are shared with the original block (no copy) where the layouts agree (expert stacks of gpt-oss and
  Llama 4 are transposed, Inkling's shared experts are appended: converted once, a copy). The adapter returns what the block returned: a tensor, gpt-oss's ``(hidden, router_scores)``
  or Llama 4's ``(hidden [T, H], router_logits)``. Router-logit recording for auxiliary losses
  (``output_router_logits``) is not reproduced: patched models are for inference.
- :func:`register` adds ``"moekit"`` to transformers' ``ExpertsInterface``: transformers keeps its
  router, moekit runs the experts (``fused_experts``) on the block's own weights.
"""

from __future__ import annotations

import re

import torch

from ..experts.layout import FusedLayout, down_rows, gate_up_rows, get_fused_layout
from ..experts.routed import RoutedExperts
from ..loading.architectures import ArchSpec, plan_layers, rename_block_key
from ..loading.modules import build_layer
from ..loading.plan import LayerPlan
from ..ops.activation import SOFTCAP_GATE, SOFTCAP_UP, SWIGLUOAI_ALPHA, activation_from_hf

#: tensors the router takes at construction (a selection bias, a hash table), by moekit name
_CONSTRUCTION = ("router.e_score_correction_bias", "router.hash_indices_table")

class _UnallocatedRoutedExperts(RoutedExperts):
    """RoutedExperts whose weights start on the meta device: :func:`patch` adopts the block's own."""

    def __init__(self, *args, device=None, **kwargs):
        super().__init__(*args, device="meta", **kwargs)


class MoEBlockAdapter(torch.nn.Module):
    """Wraps a moekit layer so it is called like the transformers block it replaces.

    forward(hidden_states [..., H], input_ids=None) -> same as the original block (see module docs).
    """

    def __init__(self, moe, plan: LayerPlan):
        super().__init__()
        self.moe = moe
        self.plan = plan
        self.output = plan.output
        self.needs_input_ids = plan.needs_input_ids

    def forward(self, hidden_states: torch.Tensor, input_ids: torch.Tensor | None = None, **_unused):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        ids = input_ids.reshape(-1) if (self.needs_input_ids and input_ids is not None) else None
        if self.output == "hidden":
            return self.moe(x, input_ids=ids).reshape(shape)
        logits = self.moe.gate(x)
        out = self.moe(x, logits, input_ids=ids)
        if self.output == "hidden_logits":  # Llama 4: flattened output and the router logits
            return out, logits
        weights, _ = self.moe.router.select_experts(x, logits)  # gpt-oss: (hidden, router_scores [T, K])
        return out.reshape(shape), weights.to(hidden_states.dtype)


def _model_config_dict(model) -> dict:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise TypeError(f"patch() needs a transformers PreTrainedModel (with .config), got {type(model).__name__}")
    d = cfg.to_dict()
    d.setdefault("model_type", getattr(cfg, "model_type", None))
    return d


def patch(model, *, backend: str = "auto") -> list[str]:
    """Replace every MoE block of ``model`` by a moekit layer sharing its weights; returns their paths.

    The block is the module at the spec's block attribute of decoder layer ``N`` (``layers.N.mlp``,
    ``layers.N.mixer``, ...), wherever the decoder stack sits (``model.``, ``model.language_model.``, a
    text-only model). Where the MoE is made of attributes of the decoder layer (Gemma 4) the layer stays:
    its ``experts`` attribute becomes a :class:`LayerMoEAdapter` running the whole moekit layer on the
    layer's input, and the other MoE attributes (router, the norms around the experts, now inside the
    moekit layer) become pass-throughs. The path returned is then the decoder layer's.
    Supported: :func:`moekit.loading.architectures.supported_model_types`; others raise
    ``NotImplementedError`` listing the supported ones.
    """
    spec, plans = plan_layers(_model_config_dict(model))
    by_idx = {p.layer_idx: p for p in plans}
    tail = r"" if spec.layer_level else r"\." + re.escape(spec.block)
    block_re = re.compile(r"(?:^|\.)layers\.(\d+)" + tail + r"$")
    replaced, already = [], 0
    for name, module in list(model.named_modules()):
        m = block_re.search(name)
        if m is None or int(m.group(1)) not in by_idx:
            continue
        if isinstance(module, MoEBlockAdapter) or isinstance(getattr(module, "experts", None), LayerMoEAdapter):
            already += 1  # patched before: left as it is
            continue
        if not hasattr(module, "experts"):
            continue
        plan = by_idx[int(m.group(1))]
        moe = _moekit_from_block(module, spec, plan, backend)
        if spec.layer_level:
            _install_in_layer(module, spec, moe)
        else:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, MoEBlockAdapter(moe, plan))
        replaced.append(name)
    if len(replaced) + already != len(plans):
        raise RuntimeError(
            f"patch found {len(replaced)} MoE blocks but the config describes {len(plans)} "
            f"({[p.name for p in plans]}); the model structure is not the expected one"
        )
    return replaced


class LayerMoEAdapter(torch.nn.Module):
    """Stands in for the ``experts`` of a decoder layer whose MoE is made of its attributes (Gemma 4):
    called as ``experts(hidden_states [T, H], top_k_index, top_k_weights)`` with the layer's input (the
    router and the pre-experts norm are pass-throughs), it returns the complete moekit layer output."""

    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, hidden_states, top_k_index=None, top_k_weights=None):
        return self.moe(hidden_states)


class _NoRouting(torch.nn.Module):
    """A router made redundant by :class:`LayerMoEAdapter`: returns ``(None, None, None)``."""

    def forward(self, hidden_states):
        return None, None, None


def _install_in_layer(layer, spec: ArchSpec, moe) -> None:
    for member in spec.ckpt_blocks:
        if member == "experts":
            stand_in = LayerMoEAdapter(moe)
        elif rename_block_key(spec, member + ".").startswith("gate."):
            stand_in = _NoRouting()
        else:
            stand_in = torch.nn.Identity()
        setattr(layer, member, stand_in)


@torch.no_grad()
def _moekit_from_block(block, spec: ArchSpec, plan: LayerPlan, backend: str):
    """A moekit layer built around the block's own tensors: every tensor of the block is adopted under
    its moekit name (the spec's renames, as the loader reads checkpoints), shared, not copied; expert
    stacks in another layout (and Inkling's shared experts appended as routed experts) are converted once."""
    own = {}
    members = spec.ckpt_blocks if spec.layer_level else ("",)
    for member in members:
        sub = block.get_submodule(member) if member else block
        pre = member + "." if member else ""
        for pname, t in list(sub.named_parameters()) + list(sub.named_buffers()):
            if t.device.type == "meta":
                raise ValueError(
                    f"{plan.name}.{pre}{pname} is on the meta device (offloaded or not materialised); patch() "
                    "needs the block's weights in memory"
                )
            own[pre + pname] = t
    experts = block.experts
    tensors = {rename_block_key(spec, n): t for n, t in own.items() if rename_block_key(spec, n) in _CONSTRUCTION}
    dtype = _expert_stack(experts).dtype
    layer = build_layer(plan, device=_expert_stack(experts).device, dtype=dtype, backend=backend, tensors=tensors,
                        routed_experts_cls=_UnallocatedRoutedExperts, module_device="meta")
    layer.routed_experts.adopt_weights(*_expert_stacks(experts, plan, spec, block))
    targets = {n: t for n, t in list(layer.named_parameters()) + list(layer.named_buffers())
               if not n.startswith("routed_experts.") or n.startswith("routed_experts.expert_output_norm.")}
    skip = {n for n in own if n.startswith("experts.") and n.count(".") == 1} | set(spec.appended_experts)
    for n, t in own.items():
        rel = rename_block_key(spec, n)
        if n in skip or rel in _CONSTRUCTION:
            continue
        if rel not in targets:
            raise NotImplementedError(f"{plan.name}: the block's tensor {n!r} has no place in the moekit layer ({rel!r})")
        _set_tensor(layer, rel, t)
        targets.pop(rel)
    left = [n for n, t in targets.items() if t is not None and t.device.type == "meta"]
    if left:
        raise NotImplementedError(f"{plan.name}: the block has no tensors for {left}")
    return layer


def _set_tensor(layer, name: str, t: torch.Tensor) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = layer.get_submodule(parent_name) if parent_name else layer
    if leaf in parent._parameters:
        parent._parameters[leaf] = t if isinstance(t, torch.nn.Parameter) else torch.nn.Parameter(t, False)
    else:
        parent._buffers[leaf] = t


def _expert_stack(ex):
    """The input-side expert stack: ``gate_up_proj`` (gated) or ``up_proj`` (non-gated, Nemotron-H)."""
    return ex.gate_up_proj if hasattr(ex, "gate_up_proj") else ex.up_proj


def _expert_stacks(ex, plan: LayerPlan, spec: ArchSpec, block):
    """(w13 [E, 2I, H], w2 [E, H, I], b13 [E, 2I] | None, b2 [E, H] | None) of a transformers experts
    module (``_stacks``), followed by the ``[S, ...]`` stacks of ``spec.appended_experts`` (a copy)."""
    w13, w2, b13, b2 = _stacks(ex, plan.num_experts - plan.routed_shared_experts, plan.has_bias,
                               get_fused_layout(plan.fused_layout))
    if spec.appended_experts:
        g, u, d = (block.get_submodule(n.rpartition(".")[0]).get_parameter(n.rpartition(".")[2])
                   for n in spec.appended_experts)
        w13, w2 = torch.cat([w13, torch.cat([g, u], dim=1)]), torch.cat([w2, d])
    return w13, w2, b13, b2


def _stacks(ex, num_experts: int, has_bias: bool, layout: FusedLayout):
    """(w13, w2, b13, b2) of a transformers experts module stored in ``layout``: the module's own tensors
    for "rows", converted copies otherwise. LongCat's gate/up stack has ``E + Z`` rows: the first ``E``
    are the real experts."""
    w13, w2 = gate_up_rows(_expert_stack(ex), layout), down_rows(ex.down_proj, layout)
    b13 = gate_up_rows(ex.gate_up_proj_bias, layout, bias=True) if has_bias else None
    b2 = ex.down_proj_bias if has_bias else None
    if w13.shape[0] != num_experts:
        w13, b13 = w13[:num_experts], (b13[:num_experts] if b13 is not None else None)
    if layout.transposed or layout.interleaved:
        w13, w2 = w13.contiguous(), w2.contiguous()
    return w13, w2, b13, b2


# -- transformers' experts switch ------------------------------------------------------------------
def _alpha_checked(m) -> tuple[str, float]:
    alpha = float(getattr(m, "alpha", getattr(m, "swiglu_alpha", SWIGLUOAI_ALPHA)))
    if abs(alpha - SWIGLUOAI_ALPHA) > 1e-9:
        raise NotImplementedError(f"{type(m).__name__} with swiglu alpha={alpha}: moekit's swigluoai uses 1.702")
    return "swigluoai", float(m.limit)


def _softcapped(m) -> tuple[str, None]:
    caps = (float(m.act_fn.gate_softcap.softcap), float(m.act_fn.up_softcap.softcap))
    if caps != (SOFTCAP_GATE, SOFTCAP_UP):
        raise NotImplementedError(f"{type(m).__name__} with softcaps {caps}: moekit's softcap_swiglu uses "
                                  f"({SOFTCAP_GATE}, {SOFTCAP_UP})")
    return "softcap_swiglu", None


def _hf_act(m) -> tuple[str, None]:
    cfg = m.config
    name = getattr(cfg, "hidden_act", None) or getattr(cfg, "hidden_activation", None) or "silu"  # Gemma: the latter
    return activation_from_hf(name), None


#: experts classes with their own gate function -> (moekit activation, swiglu_limit) of a module
_GATE_FUNCTIONS = {
    "GptOssExperts": _alpha_checked,
    "MiniMaxM3VLExperts": _alpha_checked,
    "DeepseekV4Experts": lambda m: ("silu", float(m.limit)),
    **dict.fromkeys(("Glm5NextTextExperts", "HYV4Experts", "HYV4VLExperts"), lambda m: ("silu", float(m.swiglu_limit))),
    "BeamExperts": _hf_act,  # silu in fp32: what moekit's epilogue does anyway
    **dict.fromkeys(("Inkling2Experts", "Inkling2LoopExperts"), _softcapped),
}


def _experts_activation(module) -> tuple[str, float | None]:
    """(moekit activation, swiglu_limit) equal to the experts module's gate function."""
    from transformers.integrations import moe as hf_moe

    cls = type(module)
    name = cls.__name__
    if name in _GATE_FUNCTIONS:
        return _GATE_FUNCTIONS[name](module)
    if not getattr(module, "has_gate", True):  # non-gated (Nemotron-H): act(up x)
        return activation_from_hf(getattr(module.config, "mlp_hidden_act", "relu2")), None
    if getattr(cls, "_apply_gate", None) is not getattr(hf_moe, "_default_apply_gate", None):
        raise NotImplementedError(f"experts_implementation='moekit' does not know the gate function of {name}")
    return _hf_act(module)


def _experts_weights(module):
    """(w13 [E, 2I, H], w2 [E, H, I], b13 [E, 2I] | None, b2 [E, H] | None) for ``fused_experts``."""
    if not getattr(module, "is_transposed", False) and getattr(module, "is_concatenated", True):
        b13 = module.gate_up_proj_bias if module.has_bias else None
        b2 = module.down_proj_bias if module.has_bias else None
        return _expert_stack(module), module.down_proj, b13, b2
    key = (module.gate_up_proj.data_ptr(), module.gate_up_proj._version, module.down_proj._version)
    cache = getattr(module, "_moekit_converted", None)
    if cache is None or cache[0] != key:
        layout = FusedLayout(transposed=bool(module.is_transposed), interleaved=not module.is_concatenated)
        stacks = _stacks(module, module.gate_up_proj.shape[0], module.has_bias, layout)
        cache = (key, tuple(t.detach() if t is not None else None for t in stacks))
        module._moekit_converted = cache
    return cache[1]


def moekit_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers experts forward on moekit: hidden_states [T, H], top_k_index [T, K] int,
    top_k_weights [T, K] float -> [T, H] (dtype of hidden_states)."""
    from ..ops.api import fused_experts

    if getattr(self, "has_post_expert_norm", False):
        raise NotImplementedError(f"experts_implementation='moekit': post-expert norm ({type(self).__name__})")
    if getattr(self, "_is_expert_parallel", False):
        raise NotImplementedError("experts_implementation='moekit' with transformers' expert parallelism")
    activation, limit = _experts_activation(self)
    w13, w2, b13, b2 = _experts_weights(self)
    return fused_experts(
        hidden_states,
        w13,
        w2,
        top_k_weights.float(),
        top_k_index,
        activation=activation,
        w1_bias=b13,
        w2_bias=b2,
        swiglu_limit=limit,
    )


def register(name: str = "moekit") -> str:
    """Register moekit in transformers' experts switch; returns the name to pass as
    ``experts_implementation``. Works for every architecture decorated with
    ``@use_experts_implementation`` (all supported ones except LongCat-Flash and Llama 4)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(name, moekit_experts_forward)
    return name
