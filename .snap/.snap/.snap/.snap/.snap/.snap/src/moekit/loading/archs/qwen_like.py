"""Qwen-MoE-shaped blocks (``gate.weight``, softmax/sigmoid top-k, optional shared expert): Qwen3.5-MoE,
Qwen3-VL-MoE and Qwen3-Omni-MoE (text towers), Qwen4-exp, Mellum, FlexOlmo, Lara-mini, Flint; ERNIE-4.5-MoE;
the DeepSeek-V2-shaped OCR towers (DeepSeek-OCR-2, Unlimited-OCR)."""

from __future__ import annotations

from .common import E_KEYS, QWEN_RENAMES, ArchSpec, act, first, get, layers, mk, period, sparse_layers, towers
from .core import _plan_deepseek_v2, _plan_olmoe, _qwen_sparse



def _plan(norm_default, *, always_norm=False, shared=None, scoring="softmax", fp32=False, which="qwen"):
    """A Qwen-style plan. shared: None, "gated" (sigmoid shared_expert_gate) or "plain" (added in full).
    which: the MoE layers: "qwen" (mlp_only_layers / decoder_sparse_step), "types" (mlp_layer_types), "all"."""

    def plan(cfg, spec):
        norm = True if always_norm else bool(get(cfg, "norm_topk_prob", norm_default))
        kw = dict(
            num_experts=int(first(cfg, E_KEYS, 8)),
            top_k=int(get(cfg, "num_experts_per_tok", 8)),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["moe_intermediate_size"]),
            routing=f"{scoring} top-k" + (", renormalised" if norm else "") + (f" + {shared} shared expert" if shared else ""),
            scoring_func=scoring,
            renormalize=norm,
            router_fp32=fp32,
            activation=act(cfg),
        )
        if shared:  # a zero-width shared expert (and its gate) adds nothing in transformers: none planned
            width = int(cfg["shared_expert_intermediate_size"])
            kw.update(shared_intermediate_size=width, shared_expert_gate=shared == "gated" and width > 0,
                      shared_activation=act(cfg))
        n = layers(cfg)
        idx = {"qwen": [i for i in range(n) if _qwen_sparse(cfg, i)], "types": sparse_layers(cfg)}.get(which, range(n))
        return [mk(spec, i, **kw) for i in idx]

    return plan


def _plan_ernie(cfg, spec):
    n = layers(cfg)
    start, end = int(get(cfg, "moe_layer_start_index", 0)), int(get(cfg, "moe_layer_end_index", -1))
    end = n - 1 if end == -1 else end
    step = period(cfg, "moe_layer_interval")
    inter = int(cfg["moe_intermediate_size"])
    norm_min = float(get(cfg, "moe_norm_min", 1e-12))
    if norm_min > 1e-12:  # transformers divides by max(Σw, moe_norm_min); the bias router by Σw (round 46)
        raise NotImplementedError(f"ERNIE-4.5-MoE with moe_norm_min = {norm_min} (above the released 1e-12): the "
                                  f"renormalisation floor is not reproduced")
    kw = dict(
        num_experts=int(first(cfg, ("moe_num_experts", "num_experts"), 64)),
        top_k=int(first(cfg, ("moe_k", "num_experts_per_tok"), 8)),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=inter,
        routing="softmax + bias top-k (fp32), renormalised" + (" + shared" if get(cfg, "moe_num_shared_experts", 0) else ""),
        has_score_bias=True,
        router_fp32=True,
        shared_intermediate_size=inter * int(get(cfg, "moe_num_shared_experts", 0)),
        shared_activation=act(cfg),
        shared_bias=bool(get(cfg, "use_bias", False)),  # the shared MLP's linears (the experts have none)
        activation=act(cfg),
    )
    return [mk(spec, i, **kw) for i in range(n) if (i + 1) % step == 0 and start <= i <= end]


def _plan_ocr(cfg, spec):
    """DeepSeek-V2 blocks at the layers ``mlp_layer_types`` marks "sparse" (no first_k_dense_replace)."""
    sparse = set(sparse_layers(cfg))
    return [p for p in _plan_deepseek_v2(dict(cfg, first_k_dense_replace=0), spec) if p.layer_idx in sparse]


ERNIE_RENAMES = (
    ("gate.moe_statics.e_score_correction_bias", "router.e_score_correction_bias"),
    ("moe_statics.e_score_correction_bias", "router.e_score_correction_bias"),
)

SPECS: tuple[ArchSpec, ...] = (
    ArchSpec("Qwen3.5-MoE", ("qwen3_5_moe_text",), "mlp", ("mlp",), QWEN_RENAMES,
             _plan(True, always_norm=True, shared="gated", which="all"), towers=towers("qwen3_5_moe")),
    # the Hub's checkpoints store [E, H, 2I] / [E, I, H] and transformers 5 saves [E, 2I, H] / [E, H, I]: the loader
    # takes whichever orientation the shape fits; a square tail is read as transformers' own from_pretrained reads it
    # (no transpose when the shape already fits its modules: "rows"; round 46, it was read transposed)
    ArchSpec("Qwen3-VL-MoE (text)", ("qwen3_vl_moe_text",), "mlp", ("mlp",), (), _plan(True, always_norm=True),
             towers=towers("qwen3_vl_moe")),
    ArchSpec("Qwen3-Omni-MoE (thinker text)", ("qwen3_omni_moe_text",), "mlp", ("mlp",), (), _plan(True),
             towers=towers("qwen3_omni_moe", key="thinker_config.text_config", stack="thinker.model.language_model.layers")),
    ArchSpec("Qwen4-exp", ("qwen4_exp_text",), "mlp", ("mlp",), QWEN_RENAMES,
             _plan(True, shared="gated", which="all"), towers=towers("qwen4_exp")),
    ArchSpec("Mellum", ("mellum",), "mlp", ("mlp",), (), _plan(True, which="types")),
    ArchSpec("FlexOlmo", ("flex_olmo",), "mlp", ("mlp",), (), _plan_olmoe),
    ArchSpec("Lara-mini", ("lara_mini",), "mlp", ("mlp",), QWEN_RENAMES,
             _plan(True, shared="plain", fp32=True, which="all")),
    ArchSpec("Flint", ("flint",), "mlp", ("mlp",), QWEN_RENAMES,
             _plan(True, shared="plain", scoring="sigmoid", fp32=True)),
    ArchSpec("ERNIE-4.5-MoE", ("ernie4_5_moe",), "mlp", ("mlp",), ERNIE_RENAMES, _plan_ernie),
    ArchSpec("DeepSeek-OCR-2 (text)", ("deepseek_ocr2_text",), "mlp", ("mlp",), (), _plan_ocr,
             towers=towers("deepseek_ocr2")),
    ArchSpec("Unlimited-OCR (text)", ("unlimited_ocr_text",), "mlp", ("mlp",), (), _plan_ocr,
             towers=towers("unlimited_ocr")),
)

REFUSED = {
    "ernie4_5_vl_moe": "ERNIE-4.5-VL routes text and vision tokens to two modality-isolated expert sets "
    "(text_moe / vision_moe, chosen per token by moe_mm_token_type_ids); a moekit layer has one expert set "
    "and one router, so the block is not expressible (each half alone would be: softmax + bias, renormalised)",
    "ernie4_5_vl_moe_text": "see ernie4_5_vl_moe: modality-isolated expert sets chosen by token type",
}
