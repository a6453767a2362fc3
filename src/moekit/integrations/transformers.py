"""transformers integration: swap a loaded model's MoE blocks for moekit layers, or register moekit as
an experts implementation (``from_pretrained(..., experts_implementation="moekit")``).

transformers is imported inside the functions only: ``import moekit`` never needs it.

- :func:`patch` replaces every MoE block with :class:`MoEBlockAdapter` around a moekit layer. Router,
  expert and shared-expert weights are shared with the original block (no copy) where the layouts agree
  (every architecture but gpt-oss and Llama 4, whose transposed expert stacks are converted once, a
  copy). The adapter returns what the block returned: a tensor, gpt-oss's ``(hidden, router_scores)``
  or Llama 4's ``(hidden [T, H], router_logits)``. Router-logit recording for auxiliary losses
  (``output_router_logits``) is not reproduced: patched models are for inference.
- :func:`register` adds ``"moekit"`` to transformers' ``ExpertsInterface``: transformers keeps its
  router, moekit runs the experts (``fused_experts``) on the block's own weights.
"""

from __future__ import annotations

import torch

from ..experts.layout import FusedLayout, down_rows, gate_up_rows, get_fused_layout
from ..experts.routed import RoutedExperts
from ..loading.architectures import ArchSpec, plan_layers
from ..loading.modules import OutputBias, RouterLinear, SharedMLP, build_layer
from ..loading.plan import LayerPlan
from ..ops.activation import activation_from_hf



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
        if self.output == "hidden_scores_over_k":  # OpenAI privacy filter: router_scores / K
            weights = weights / weights.shape[-1]
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

    Supported: the architectures of :func:`moekit.loading.architectures.supported_model_types`.
    Unsupported architectures raise ``NotImplementedError`` listing the supported ones.
    """
    spec, plans = plan_layers(_model_config_dict(model))
    by_tail: dict[str, list[LayerPlan]] = {}
    for p in plans:
        by_tail.setdefault(_tail(p.name), []).append(p)
    replaced, already = [], 0
    for name, module in list(model.named_modules()):
        plan = _plan_of(name, by_tail)
        if plan is None:
            continue
        if isinstance(module, MoEBlockAdapter):
            already += 1  # patched before: left as it is
            continue
        if _get(module, spec.experts_paths[0]) is None:
            continue
        adapter = MoEBlockAdapter(_moekit_from_block(module, plan, spec, backend), plan)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, adapter)
        replaced.append(name)
    if len(replaced) + already != len(plans):
        raise RuntimeError(
            f"patch found {len(replaced)} MoE blocks but the config describes {len(plans)} "
            f"({[p.name for p in plans]}); the model structure is not the expected one"
        )
    return replaced


def _tail(name: str) -> str:
    return ".".join(name.split(".")[-3:])  # "layers.3.mlp", "blocks.0.ffn"


def _plan_of(name: str, by_tail: dict) -> LayerPlan | None:
    """The plan whose block path is ``name``, or a path ``name`` is a tail of (a sub-model was patched)
    or that is a tail of ``name`` (the model sits inside a larger one)."""
    for p in by_tail.get(_tail(name), ()):
        if p.name == name or p.name.endswith("." + name) or name.endswith("." + p.name):
            return p
    return None


def _get(module, path: str):
    """``module.a.b`` for ``path="a.b"`` (None where an attribute is missing)."""
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _router_parts(block, spec: ArchSpec):
    """(linear weight, linear bias or None, router module holding the buffers) of a transformers block."""
    if spec.router_path:
        r = lin = _get(block, spec.router_path)
    else:
        r = block.gate if hasattr(block, "gate") else block.router
        lin = r.classifier if hasattr(r, "classifier") else r
    return lin.weight, getattr(lin, "bias", None), r


def _shared_module(block, spec: ArchSpec, plan: LayerPlan):
    if not plan.shared_intermediate_size:
        return None
    mlp = _get(block, spec.shared_path) if spec.shared_path else (
        getattr(block, "shared_experts", None) or block.shared_expert)
    return SharedMLP.around(mlp, plan.shared_activation, scale=plan.shared_scale) if plan.shared_scale != 1.0 else mlp


@torch.no_grad()
def _moekit_from_block(block, plan: LayerPlan, spec: ArchSpec, backend: str):
    """A moekit layer built around the block's own tensors: router weights, selection bias / hash table,
    shared experts and expert stacks are shared (expert stacks in another layout are converted once)."""
    weight, lin_bias, router = _router_parts(block, spec)
    for pname, p in block.named_parameters():
        if p.device.type == "meta":
            raise ValueError(
                f"{plan.name}.{pname} is on the meta device (offloaded or not materialised); patch() needs "
                "the block's weights in memory"
            )
    tensors = {}
    if plan.has_score_bias:
        bias = _get(block, spec.score_bias_path) if spec.score_bias_path else router.e_score_correction_bias
        tensors["router.e_score_correction_bias"] = bias.reshape(-1)
    if plan.hash_routing:
        tensors["router.hash_indices_table"] = router.tid2eid
    gate = RouterLinear(weight.shape[1], weight.shape[0], bias=plan.router_bias, fp32=plan.router_fp32, device="meta")
    gate.weight = weight
    if plan.router_bias:
        gate.bias = lin_bias
    output_bias = None
    if plan.output_bias:
        output_bias = OutputBias(plan.hidden_size, device="meta")
        output_bias.bias = block.bias
    layer = build_layer(
        plan,
        device=weight.device,
        dtype=weight.dtype,
        backend=backend,
        tensors=tensors,
        routed_experts_cls=_UnallocatedRoutedExperts,
        gate=gate,
        shared_experts=_shared_module(block, spec, plan),
        shared_expert_gate=block.shared_expert_gate if plan.shared_expert_gate else None,
        output_bias=output_bias,
    )
    layer.routed_experts.adopt_weights(*_block_stacks(block, spec, plan))
    return layer


def _block_stacks(block, spec: ArchSpec, plan: LayerPlan):
    """The block's expert stacks in moekit's layout, from ``spec.experts_paths`` in ``spec.memory_layout``."""
    paths = spec.experts_paths
    if len(paths) == 3:  # flat [E * I, H] gate, up, down-transposed stacks (DBRX): a converted copy
        e = plan.num_experts
        g, u, d = (_get(block, p).view(e, -1, _get(block, p).shape[-1]) for p in paths)
        return torch.cat([g, u], 1), d.transpose(1, 2).contiguous(), None, None
    layout = get_fused_layout(spec.memory_layout or plan.fused_layout)
    w13, w2 = _get(block, paths[0]), _get(block, paths[1])
    b13 = _get(block, paths[0] + "_bias") if plan.has_bias else None
    b2 = _get(block, paths[1] + "_bias") if plan.has_bias else None
    return _convert_stacks(w13, w2, b13, b2, plan.num_experts, layout)


def _convert_stacks(w13, w2, b13, b2, num_experts: int, layout: FusedLayout):
    """(w13 [E, 2I, H], w2 [E, H, I], b13 [E, 2I] | None, b2 [E, H] | None) from fused stacks stored in
    ``layout``: the tensors themselves for "rows", converted copies otherwise.
    LongCat's gate/up stack has ``E + Z`` rows: the first ``E`` are the real experts."""
    w13, w2 = gate_up_rows(w13, layout), down_rows(w2, layout)
    b13 = gate_up_rows(b13, layout, bias=True) if b13 is not None else None
    if w13.shape[0] != num_experts:
        w13, b13 = w13[:num_experts], (b13[:num_experts] if b13 is not None else None)
    if layout.transposed or layout.interleaved:
        w13, w2 = w13.contiguous(), w2.contiguous()
    return w13, w2, b13, b2


# -- transformers' experts switch ------------------------------------------------------------------
_FIXED_ACTIVATION = {"AriaExperts": "silu"}  # experts whose activation ignores config.hidden_act


def _experts_activation(module) -> tuple[str, float | None]:
    """(moekit activation, swiglu_limit) equal to the experts module's gate function."""
    from transformers.integrations import moe as hf_moe

    cls = type(module)
    apply_gate = getattr(cls, "_apply_gate", None)
    name = cls.__name__
    if name in ("GptOssExperts", "OpenAIPrivacyFilterExperts"):  # interleaved / concatenated gate-up
        if abs(float(module.alpha) - 1.702) > 1e-9:
            raise NotImplementedError(f"{name} with swiglu alpha={module.alpha}: moekit's swigluoai uses 1.702")
        return "swigluoai", float(module.limit)
    if name == "DeepseekV4Experts":
        return "silu", float(module.limit)
    if name in _FIXED_ACTIVATION:
        return _FIXED_ACTIVATION[name], None
    if apply_gate is not getattr(hf_moe, "_default_apply_gate", None):
        raise NotImplementedError(f"experts_implementation='moekit' does not know the gate function of {name}")
    return activation_from_hf(getattr(module.config, "hidden_act", "silu")), None


def _experts_weights(module):
    """(w13 [E, 2I, H], w2 [E, H, I], b13 [E, 2I] | None, b2 [E, H] | None) for ``fused_experts``."""
    if not getattr(module, "is_transposed", False) and getattr(module, "is_concatenated", True):
        b13 = module.gate_up_proj_bias if module.has_bias else None
        b2 = module.down_proj_bias if module.has_bias else None
        return module.gate_up_proj, module.down_proj, b13, b2
    key = (module.gate_up_proj.data_ptr(), module.gate_up_proj._version, module.down_proj._version)
    cache = getattr(module, "_moekit_converted", None)
    if cache is None or cache[0] != key:
        layout = FusedLayout(transposed=bool(module.is_transposed), interleaved=not module.is_concatenated)
        b13, b2 = (module.gate_up_proj_bias, module.down_proj_bias) if module.has_bias else (None, None)
        stacks = _convert_stacks(module.gate_up_proj, module.down_proj, b13, b2, module.gate_up_proj.shape[0], layout)
        cache = (key, tuple(t.detach() if t is not None else None for t in stacks))
        module._moekit_converted = cache
    return cache[1]


def moekit_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers experts forward on moekit: hidden_states [T, H], top_k_index [T, K] int,
    top_k_weights [T, K] float -> [T, H] (dtype of hidden_states)."""
    from ..ops.api import fused_experts

    if not getattr(self, "has_gate", True):
        raise NotImplementedError(f"experts_implementation='moekit': non-gated experts ({type(self).__name__})")
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
