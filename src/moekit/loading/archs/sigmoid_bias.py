"""Ungrouped sigmoid + selection-bias routers (the MiniMax-M2 lineage) and the Inkling family (issue #13):
MiniMax-M2, MiniMax-M3-VL (text), HY-V3, AFMoE, LFM2-MoE, Laguna, Kolibri-1 (+ 1.1), Ergo, Step-3.7 (text),
Muse Spark (text), Inkling, Inkling-2 and Inkling-2-Loop (text)."""

from __future__ import annotations

from ...ops.activation import SOFTCAP_GATE, SOFTCAP_UP, SWIGLUOAI_ALPHA
from .common import (DS_RENAMES, ArchSpec, act, dense_head, first, get, layers, mk, post_clamp_limits, sparse_layers,
                     towers)


def _plan(*, experts="num_local_experts", inter_keys=("moe_intermediate_size",), scale=None, shared=None,
          dense_key="first_k_dense_replace", norm=None, bias=True, scale_on_output=False, layer_fn=None, **extra):
    """A plan function. Each keyword names what the architecture's transformers class reads, and only that:
    ``experts``: the field of the number of routed experts; ``scale``: the field of the routed scale (None: the
    class reads none, 1.0); ``shared``: None (no shared expert), the field of its width, or ``(cfg, inter) ->
    width``; ``norm``: None = always renormalise, else the default of ``norm_topk_prob``; ``layer_fn(cfg)``: the MoE
    layers (default :func:`sparse_layers` with ``dense_key``); ``extra``: more plan fields (callables of cfg).
    Fields the config lacks take the class's defaults (:mod:`.config_defaults`) before the plan runs."""

    def plan(cfg, spec):
        renorm = True if norm is None else bool(get(cfg, "norm_topk_prob", norm))
        has_bias = bias if not callable(bias) else bias(cfg)
        inter = int(first(cfg, inter_keys, 0))
        kw = dict(
            num_experts=int(get(cfg, experts, 8)),
            top_k=int(get(cfg, "num_experts_per_tok", 2)),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=inter,
            scoring_func="sigmoid",
            renormalize=renorm,
            routed_scaling_factor=float(get(cfg, scale, 1.0)) if scale else 1.0,
            apply_routed_scale_to_output=scale_on_output,
            has_score_bias=has_bias,
            router_fp32=True,
            norm_eps=float(get(cfg, "rms_norm_eps", 1e-6)),
        )
        if shared is not None:
            kw["shared_intermediate_size"] = int(shared(cfg, inter) if callable(shared) else get(cfg, shared, 0))
        kw.update({k: (v(cfg) if callable(v) else v) for k, v in extra.items()})
        if "activation" not in kw:  # (read only where the plan does not fix it: round 65, Ergo's relu2 and the Hub's
            kw["activation"] = act(cfg)  # MiniMax-M3-VL "swigluoai" hidden_act were refused by a value never used)
        kw.setdefault("routing", kw["scoring_func"] + (" + bias" if has_bias else "") + " top-k"
                      + (", renormalised" if renorm else "")
                      + (", scaled on the output" if scale_on_output else ", scaled"))
        idx = layer_fn(cfg) if layer_fn else sparse_layers(cfg, dense_key, 0)
        return [mk(spec, i, **kw) for i in idx]

    return plan


def _times_shared(cfg, inter):
    """AFMoE: ``moe_intermediate_size * num_shared_experts`` (0: a zero-width shared MLP, no contribution)."""
    return inter * int(get(cfg, "num_shared_experts", 1))


def _hy_v3_shared(cfg, inter):
    """HY-V3: ``moe_intermediate_size * num_shared_experts``, and where that is 0 the class's ``intermediate_size``
    (transformers builds the shared MLP with ``intermediate_size or config.intermediate_size``)."""
    return inter * int(get(cfg, "num_shared_experts", 1)) or int(cfg["intermediate_size"])


def _m3_shared(cfg, inter):
    """MiniMax-M3-VL: ``shared_intermediate_size``, null meaning ``dense_intermediate_size``."""
    width = cfg.get("shared_intermediate_size")
    return int(width) if width is not None else int(cfg["dense_intermediate_size"])


#: Inkling-2 scores with ``ACT2FN[scoring_func]``: the activations moekit's routers score with
_INKLING2_SCORES = ("sigmoid", "sqrtsoftplus")


def _inkling2_scoring(cfg) -> str:
    fn = get(cfg, "scoring_func", "sigmoid")
    if fn not in _INKLING2_SCORES:
        raise NotImplementedError(
            f"Inkling-2 scoring_func={fn!r}: transformers scores the router logits with ACT2FN[{fn!r}]; of those "
            f"activations moekit's routers compute {' and '.join(map(repr, _INKLING2_SCORES))} only")
    return fn


def _not_mlp_only(cfg):
    """Kolibri-1.1: every layer but ``mlp_only_layers`` (default: the first two)."""
    dense = get(cfg, "mlp_only_layers", [0, 1])
    return [i for i in range(layers(cfg)) if i not in dense]


def _swigluoai(cfg):
    alpha = float(get(cfg, "swiglu_alpha", SWIGLUOAI_ALPHA))
    if abs(alpha - SWIGLUOAI_ALPHA) > 1e-9:
        raise NotImplementedError(f"swiglu_alpha={alpha}: moekit's swigluoai uses alpha={SWIGLUOAI_ALPHA}")
    return float(get(cfg, "swiglu_limit", 7.0))


def _softcaps(cfg):
    caps = (float(get(cfg, "mlp_gate_softcap", SOFTCAP_GATE)), float(get(cfg, "mlp_up_softcap", SOFTCAP_UP)))
    if caps != (SOFTCAP_GATE, SOFTCAP_UP):
        raise NotImplementedError(
            f"softcapped SwiGLU with mlp_gate_softcap/mlp_up_softcap={caps}: moekit's softcap_swiglu uses "
            f"({SOFTCAP_GATE}, {SOFTCAP_UP})"
        )
    return "softcap_swiglu"


#: biases on every linear of the shared MLP with ``mlp_bias=True`` (the experts have none)
_MLP_BIAS = dict(shared_bias=lambda c: bool(get(c, "mlp_bias", False)))
_STEP = _plan(experts="n_routed_experts", scale="moe_router_scaling_factor", shared="share_expert_dim",
              scale_on_output=True, **_MLP_BIAS)


def _plan_step3p7(cfg, spec):
    """Step-3.x: the clamp after SiLU with a per-layer limit (``swiglu_limits[i]``; 0 / None: plain silu)."""
    return post_clamp_limits(_STEP(cfg, spec), cfg, ("swiglu_limits",), ("swiglu_limits_shared",))


_BLOCK_BIAS = (("e_score_correction_bias", "router.e_score_correction_bias"),)
# Step-3.7's Hub layout (what transformers' save_pretrained writes, round 63): the decoder layer's moe.{gate.weight,
# router_bias}, stacked moe.{gate,up}_proj.weight [E, I, H] (:func:`..keys.expand_key` splits them per expert) and
# moe.down_proj.weight [E, H, I], and share_expert.*. The identity renames come first so that the inverse
# (checkpoint_block_key: error messages, patch()'s lookup of a block's modules) keeps transformers' names.
_STEP_RENAMES = DS_RENAMES + (
    ("gate.", "gate."), ("experts.", "experts."), ("shared_experts.", "shared_experts."),
    ("moe.gate.", "gate."), ("moe.router_bias", "router.e_score_correction_bias"),
    ("moe.gate_proj.weight", "experts.gate_proj"), ("moe.up_proj.weight", "experts.up_proj"),
    ("moe.down_proj.weight", "experts.down_proj"), ("share_expert.", "shared_experts."))
_KOLIBRI_RENAMES = (("gate.e_score_correction_bias", "router.custom_routing_function.e_score_correction_bias"),
                    ("moe.router.expert_bias", "router.custom_routing_function.e_score_correction_bias"))
_KOLIBRI = dict(shared="shared_expert_intermediate_size", norm=False, bias=False, custom_routing="logit_bias",
                scoring_func="softmax", routing="top-k of logits + bias, sigmoid weights")  # no routed scale
SPECS: tuple[ArchSpec, ...] = (
    ArchSpec("MiniMax-M2", ("minimax_m2",), "mlp", ("block_sparse_moe", "mlp"), _BLOCK_BIAS,
             _plan(inter_keys=("intermediate_size",))),  # no shared expert, no routed scale
    # the Hub layout (what transformers' save_pretrained writes) keeps the selection bias on the block and the
    # shared MLP's gate_proj / up_proj apart (the loader writes them into gate_up_proj's rows; round 63)
    ArchSpec("MiniMax-M3-VL (text)", ("minimax_m3_vl_text",), "mlp", ("block_sparse_moe", "mlp"),
             DS_RENAMES + _BLOCK_BIAS,
             _plan(inter_keys=("intermediate_size",), scale="routed_scaling_factor", shared=_m3_shared,
                   scale_on_output=True, activation="swigluoai",
                   swiglu_limit=_swigluoai, shared_activation="swigluoai", shared_swiglu_limit=_swigluoai,
                   shared_fused=True), towers=towers("minimax_m3_vl")),
    ArchSpec("HY-V3", ("hy_v3",), "mlp", ("mlp",),
             _BLOCK_BIAS + (("expert_bias", "router.e_score_correction_bias"), ("shared_mlp.", "shared_experts.")),
             _plan(experts="num_experts", scale="router_scaling_factor", shared=_hy_v3_shared, **_MLP_BIAS)),
    ArchSpec("AFMoE", ("afmoe",), "mlp", ("mlp",),
             (("router.gate.", "gate."), ("expert_bias", "router.e_score_correction_bias")),
             _plan(experts="num_experts", scale="route_scale", shared=_times_shared,
                   layer_fn=dense_head("num_dense_layers"))),
    # transformers renormalises by Σw + 1e-6: a named routing does the same (round 46; the bias router divides by Σw)
    ArchSpec("LFM2-MoE", ("lfm2_moe",), "feed_forward", ("feed_forward",),
             (("expert_bias", "router.custom_routing_function.e_score_correction_bias"),),
             _plan(experts="num_experts", scale="routed_scaling_factor", layer_fn=dense_head("num_dense_layers"),
                   norm=True, bias=False, activation="silu",
                   custom_routing=lambda c: "sigmoid_bias_eps" if bool(get(c, "use_expert_bias", True))
                   else "sigmoid_eps", custom_routing_arg=1e-6, scoring_func="softmax",
                   routing=lambda c: "sigmoid" + (" + bias" if get(c, "use_expert_bias", True) else "")
                   + " top-k, w / (Σw + 1e-6), scaled")),
    ArchSpec("Laguna", ("laguna",), "mlp", ("mlp",), DS_RENAMES + (
        ("experts.e_score_correction_bias", "router.e_score_correction_bias"), ("shared_expert.", "shared_experts.")),
             _plan(experts="num_experts", scale="moe_routed_scaling_factor", shared="shared_expert_intermediate_size",
                   scale_on_output=True, logit_softcap=lambda c: float(c["moe_router_logit_softcapping"])
                   if get(c, "moe_router_logit_softcapping", 0) else None)),
    ArchSpec("Kolibri-1", ("kolibri1",), "mlp", ("mlp",), _KOLIBRI_RENAMES, _plan(**_KOLIBRI),
             layer_members=("moe",)),
    ArchSpec("Kolibri-1.1", ("kolibri1_1",), "mlp", ("mlp",), _KOLIBRI_RENAMES,
             _plan(**_KOLIBRI, layer_fn=_not_mlp_only), layer_members=("moe",)),
    # Ergo: relu2 experts, each expert's output RMS-normed with its own weight before the routing weight; the
    # shared expert's output RMS-normed too. Checkpoints in its training framework's layout (``feed_forward``,
    # the router kernel and the shared projections stored [in, out]).
    ArchSpec("Ergo", ("ergo",), "mlp", ("feed_forward", "mlp"), (
        ("gate_kernel", "gate.weight"), ("gate.linear.", "gate."), ("router_bias", "router.e_score_correction_bias"),
        ("gate.e_score_correction_bias", "router.e_score_correction_bias"),
        ("up_proj", "experts.up_proj"), ("down_proj", "experts.down_proj"),
        ("expert_output_norm.scale", "routed_experts.expert_output_norm.weight"),
        ("experts.post_expert_norm.", "routed_experts.expert_output_norm."),
        ("shared_up_proj", "shared_experts.up_proj.weight"), ("shared_down_proj", "shared_experts.down_proj.weight"),
        ("shared_expert_output_norm.scale", "shared_experts.norm.weight")),
        _plan(experts="num_experts", scale="moe_routed_scaling_factor", shared="shared_intermediate_size",
              dense_key="num_dense_blocks", activation="relu2", shared_activation="relu2",
              expert_output_norm="expert_rmsnorm", shared_output_norm=True,
              expert_norm_eps=lambda c: float(c["rms_norm_eps"])),
        fused_layout="transposed", transposed=("gate_kernel", "shared_up_proj", "shared_down_proj")),
    # the experts switch reaches Step-3.7 from transformers 5.25 (its experts class decorated there)
    ArchSpec("Step-3.7 (text)", ("step3p5",), "mlp", ("mlp",), _STEP_RENAMES, _plan_step3p7,
             towers=towers("step3p7"), layer_members=("moe", "share_expert")),
    ArchSpec("Muse Spark (text)", ("muse_spark_text",), "mlp", ("mlp",),
             DS_RENAMES + (("pre_expert_proj.", "routed_input_transform.0."),
                           ("pre_expert_norm.", "routed_input_transform.1."),
                           ("experts.post_expert_norm.", "routed_experts.expert_output_norm."),
                           ("post_expert_proj.", "routed_output_transform.")),
             _plan(scale="routed_scaling_factor", gate_input="block",
                   logit_scale=lambda c: float(get(c, "output_multiplier", 1.0)),
                   input_transform="linear_centered_norm", output_transform="linear",
                   expert_output_norm="scaled_rmsnorm", expert_norm_eps=lambda c: float(get(c, "post_norm_eps", 1e-6)),
                   block_hidden_size=lambda c: int(c["hidden_size"]),
                   hidden_size=lambda c: int(get(c, "moe_hidden_size", c["hidden_size"]))),
             experts_switch=False, towers=towers("muse_spark")),
    ArchSpec("Inkling (text)", ("inkling_text",), "mlp", ("mlp",),
             DS_RENAMES + (("gate.global_scale", "routed_output_transform.weight"),),
             _plan(experts="n_routed_experts", scale="route_scale", output_transform="scale",
                   num_experts=lambda c: int(get(c, "n_routed_experts", 8)) + int(get(c, "n_shared_experts", 1)),
                   routed_shared_experts=lambda c: int(get(c, "n_shared_experts", 1))),
             towers=towers("inkling"),
             appended_experts=("shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj")),
    ArchSpec("Inkling-2 (text)", ("inkling2_text", "inkling2_loop_text"), "mlp", ("mlp",), DS_RENAMES,
             _plan(experts="n_routed_experts", scale="route_scale", activation=_softcaps,
                   scoring_func=_inkling2_scoring),
             towers=towers("inkling2", "inkling2_loop")),
)
