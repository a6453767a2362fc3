"""The DeepSeek-V3 family beyond DeepSeek-V3 and GLM-4.5 (issue #13): a sigmoid (or softmax) router with a
selection bias, optional grouped top-k, ``routed_scaling_factor`` and shared experts — DeepSeek-V3.2,
GLM-4.5V (text), GLM-4.7-Flash (glm4_moe_lite), GLM-5 (glm_moe_dsa, glm5_next), Solar Open, EXAONE-MoE,
Kimi-Linear, Bailing-hybrid, dots1, dots3 (text), MiMo-V2-Flash, HY-V4 (+ VL text), A.X-K1, A.X-K2,
Beam, Nemotron-H, Mistral 4 and Mistral Large 4 (text)."""

from __future__ import annotations

from dataclasses import replace

from .common import DS_RENAMES, ArchSpec, act, dense_head, first, get, mk, post_clamp_limits, sparse_layers, towers

_E = ("n_routed_experts", "num_experts", "num_local_experts")
_K = ("num_experts_per_tok", "num_experts_per_token")
_G = ("n_group", "num_expert_group")
_SHARED_N = ("n_shared_experts", "num_shared_experts")


def _plan(*, scoring="sigmoid", bias=True, norm_default=True, always_norm=False, scale_on_output=False,
          shared=True, grouped="always", limit=False, shared_limit=False, silu_experts=False, fp32=True, final=None,
          layer_fn=None, gated=True):
    """A plan function for one variant of the DeepSeek-V3 block (keywords: what differs). ``silu_experts``: the
    routed experts run SiLU whatever ``hidden_act`` says (HY-V4, GLM-5-Next: their experts call ``F.silu``); the
    shared MLP runs ``hidden_act``."""

    def plan(cfg, spec):
        norm = always_norm or bool(first(cfg, ("norm_topk_prob", "moe_renormalize"), norm_default))
        g = first(cfg, _G, None)
        use_groups = g is not None and (grouped == "always" or int(g) > 1)
        inter = int(cfg["moe_intermediate_size"])
        kw = dict(
            num_experts=int(first(cfg, _E, 256)),
            top_k=int(first(cfg, _K, 8)),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=inter,
            scoring_func=scoring,
            renormalize=norm,
            routed_scaling_factor=float(get(cfg, "routed_scaling_factor", 1.0)),
            apply_routed_scale_to_output=scale_on_output,
            has_score_bias=bias,
            zero_score_bias=not bias and use_groups,  # grouped by the top-2 sum of the scores, no bias
            router_fp32=fp32,
            activation="silu" if silu_experts else act(cfg, gated),
            shared_activation=act(cfg, gated),
            final_transform=final,
            norm_eps=float(get(cfg, "rms_norm_eps", 1e-6)),
        )
        if use_groups:
            kw.update(num_expert_group=int(g), topk_group=int(first(cfg, ("topk_group",), 1)))
        if limit and cfg.get("swiglu_limit") is not None:
            kw.update(swiglu_limit=float(cfg["swiglu_limit"]))
            if shared_limit:  # GLM-5-Next clamps its shared MLP too; HY-V4 does not
                kw.update(shared_swiglu_limit=float(cfg["swiglu_limit"]))
        if shared:
            n = int(first(cfg, _SHARED_N, 1))
            width = first(cfg, ("shared_experts_intermediate_size",), inter)
            kw.update(shared_intermediate_size=int(width) * n)
        kw["routing"] = (
            f"{scoring}{' + bias' if bias else ''}"
            + (f", grouped top-k (G={kw['num_expert_group']}, keep {kw['topk_group']})" if use_groups else " top-k")
            + (", renormalised" if norm else "")
            + (", scaled on the output" if scale_on_output else ", scaled")
        )
        idx = layer_fn(cfg) if layer_fn else sparse_layers(cfg, "first_k_dense_replace", 0)
        return [mk(spec, i, **kw) for i in idx]

    return plan


def _nemotron_layers(cfg):
    return [i for i, t in enumerate(get(cfg, "layers_block_type", [])) if t == "moe"]


def _plan_nemotron(cfg, spec):
    hidden_act = get(cfg, "mlp_hidden_act", "relu2")
    if hidden_act != "relu2":
        raise NotImplementedError(
            f"Nemotron-H mlp_hidden_act={hidden_act!r}: its experts and shared MLP compute act(up x), not gated; "
            "moekit's only non-gated activation is relu2 (a gated SiLU/GELU would need the gate rows the checkpoint "
            "does not have)")
    base = _plan(layer_fn=_nemotron_layers, gated=False)(dict(cfg, hidden_act="relu2"), spec)
    latent = cfg.get("moe_latent_size")
    # transformers' NemotronHMLP takes ``intermediate_size or config.intermediate_size``: a width of 0 is the dense
    # MLP's (round 65: planned as no shared expert, and the checkpoint's shared MLP refused)
    width = int(get(cfg, "moe_shared_expert_intermediate_size", 0)) or int(get(cfg, "intermediate_size", 0))
    shared = dict(shared_intermediate_size=width)
    bias = bool(cfg.get("mlp_bias"))  # biases on the shared MLP and the latent projections (not the experts)
    shared.update(shared_bias=bias)
    if latent:  # the experts run on a latent; the gate and the shared experts read the block input
        proj = "linear_bias" if bias else "linear"
        shared.update(block_hidden_size=int(cfg["hidden_size"]), hidden_size=int(latent), gate_input="block",
                      input_transform=proj, output_transform=proj)
    return [replace(p, **shared) for p in base]


def _plan_bailing(cfg, spec):
    """Bailing-hybrid: per-layer limits clamping silu(g) after the activation (transformers >= 5.25)."""
    return post_clamp_limits(_STANDARD(cfg, spec), cfg, ("expert_swiglu_limit_list", "swiglu_limits"),
                             ("share_expert_swiglu_limit_list", "swiglu_limits_shared"))


def _s(name, types, plan, *, block="mlp", renames=DS_RENAMES, switch=True, wrappers=(), ckpt=(), members=(),
       **spec):
    return ArchSpec(name, types, block, ckpt + (block,), renames, plan, experts_switch=switch,
                    towers=towers(*wrappers), layer_members=members, **spec)


_STANDARD = _plan()
_HY_RENAMES = DS_RENAMES + (("shared_experts.linear_gate.", "shared_experts.gate_proj."),)
SPECS: tuple[ArchSpec, ...] = (
    _s("DeepSeek-V3.2", ("deepseek_v32",), _STANDARD),
    _s("GLM-4.5V (text)", ("glm4v_moe_text",), _plan(layer_fn=dense_head("first_k_dense_replace")),
       wrappers=("glm4v_moe",)),
    _s("GLM-4.7-Flash (Glm4MoeLite)", ("glm4_moe_lite",), _STANDARD),
    _s("GLM-5 (GlmMoeDsa)", ("glm_moe_dsa",), _STANDARD),
    _s("Solar Open", ("solar_open",), _STANDARD),
    _s("EXAONE-MoE", ("exaone_moe",), _STANDARD, renames=DS_RENAMES + (("e_score_correction_bias", "router.e_score_correction_bias"),)),
    _s("Kimi-Linear", ("kimi_linear",), _STANDARD, ckpt=("block_sparse_moe",)),
    _s("Bailing-hybrid", ("bailing_hybrid",), _plan_bailing, renames=DS_RENAMES + (("gate.expert_bias", "router.e_score_correction_bias"),)),
    _s("dots1", ("dots1",), _plan(norm_default=False)),
    _s("MiniCPM5-MoE", ("minicpm5_moe",), _STANDARD),
    _s("dots3 (text)", ("dots3_note_text",), _STANDARD, wrappers=("dots3_note",)),
    _s("MiMo-V2-Flash", ("mimo_v2_flash",), _plan(shared=False)),
    _s("GLM-5-Next (text)", ("glm5_next_text",), _plan(limit=True, shared_limit=True, silu_experts=True),
       wrappers=("glm5_next",)),
    _s("HY-V4", ("hy_v4",), _plan(limit=True, silu_experts=True), renames=_HY_RENAMES),
    _s("HY-V4-VL (text)", ("hy_v4_vl_text",), _plan(limit=True, silu_experts=True), renames=_HY_RENAMES,
       wrappers=("hy_v4_vl",)),
    _s("A.X-K1", ("axk1",), _plan(final="rmsnorm"), renames=DS_RENAMES + (("post_mlp_layernorm.", "final_output_transform."),),
       members=("post_mlp_layernorm",)),
    _s("A.X-K2", ("axk2",), _plan(grouped="if_set")),
    _s("Beam", ("beam",), _plan(shared=False, scale_on_output=True)),
    _s("Nemotron-H", ("nemotron_h",), _plan_nemotron, block="mixer", renames=DS_RENAMES + (
        ("fc1_latent_proj.", "routed_input_transform."), ("fc2_latent_proj.", "routed_output_transform.")),
       ckpt_stacks=("backbone.layers",)),
    _s("Mistral 4", ("mistral4",), _plan(scoring="softmax", bias=False, fp32=False), renames=()),
    _s("Mistral Large 4 (text)", ("mistral_large4_text",), _plan(scoring="softmax", bias=False, always_norm=True),
       renames=tuple((f"shared_experts.{w}.", f"shared_experts.{p}.") for w, p in
                      (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj"))),
       wrappers=("mistral_large4",), members=("experts", "gate", "shared_experts")),
)
