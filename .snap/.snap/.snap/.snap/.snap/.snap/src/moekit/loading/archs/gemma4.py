"""Gemma 4 and diffusion-Gemma (text): the MoE is made of attributes of the decoder layer (issue #13).

    logits = router.proj(rmsnorm(h) * router.scale * H^-0.5)          (the gate reads the layer input h)
    w, ids = softmax top-k, renormalised, times router.per_expert_scale[ids]
    out    = post_feedforward_layernorm_2(experts(pre_feedforward_layernorm_2(h)))

The dense MLP that runs beside it in the same layer is not part of the moekit layer.
"""

from __future__ import annotations

from .common import ArchSpec, act, get, layers, mk, required, towers


def _plan(cfg, spec):
    if not get(cfg, "enable_moe_block", False):
        return []
    kw = dict(
        num_experts=int(cfg["num_experts"]),
        top_k=int(required(cfg, "top_k_experts")),  # the class's default is null
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["moe_intermediate_size"]),
        routing="softmax top-k, renormalised, times a per-expert scale (gate on the layer input)",
        custom_routing="expert_scale",
        gate_kind="rmsnorm",
        gate_input="block",
        input_transform="rmsnorm",
        output_transform="rmsnorm",
        norm_eps=float(get(cfg, "rms_norm_eps", 1e-6)),
        activation=act(dict(hidden_act=get(cfg, "hidden_activation", "gelu_pytorch_tanh"))),
    )
    return [mk(spec, i, **kw) for i in range(layers(cfg))]


_MEMBERS = ("router", "experts", "pre_feedforward_layernorm_2", "post_feedforward_layernorm_2")
_RENAMES = (
    ("router.per_expert_scale", "router.custom_routing_function.per_expert_scale"),
    ("router.", "gate."),
    ("pre_feedforward_layernorm_2.", "routed_input_transform."),
    ("post_feedforward_layernorm_2.", "routed_output_transform."),
)
SPECS: tuple[ArchSpec, ...] = (
    ArchSpec("Gemma 4 (text)", ("gemma4_text",), "", _MEMBERS, _RENAMES, _plan, towers=towers("gemma4")),
    ArchSpec("diffusion-Gemma (text)", ("diffusion_gemma_text",), "", _MEMBERS, _RENAMES, _plan,
             towers=towers("diffusion_gemma")),
)
