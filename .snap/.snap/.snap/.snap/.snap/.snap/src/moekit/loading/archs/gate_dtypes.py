"""Router gates whose weight transformers keeps in float32 storage when a model loads in bfloat16 / float16.

transformers (5.x) keeps a parameter in float32 whatever the load dtype where the model class lists a pattern
matching its name in ``_keep_in_fp32_modules_strict`` (bfloat16 and float16 loads; ``"gate.weight"``,
``"mlp.gate.weight"``) or ``_keep_in_fp32_modules`` (float16 loads only; LongCat's ``"classifier.weight"``), the
lists of the class's submodels included; or where the module creates the parameter in float32 itself (Hunyuan-MoE's
``gate.wg``): ``from_pretrained`` then loads it in float32. A checkpoint saved from such a model stores the gate in
float32; rounding it to the load dtype sends some tokens to other experts than transformers does (round 55: 21 of
4096 tokens of a tiny DeepSeek-V3 in bfloat16). Each of these gates computes its logits in float32
(``F.linear(x.float(), weight.float())``), so moekit builds their weight in float32 for the load dtypes listed here
(:func:`moekit.loading.modules.plan_gate`) and the gate computes in float32. The patterns name the weight alone: a
gate bias (none of these gates has one) would keep the load dtype.

Keys: the ``model_type`` of config.json (wrappers and their text towers both: the wrapper's class gathers its text
model's lists). Derived from transformers 5.25's classes; tests/loading/test_audit55_router_fp32.py checks every
supported model type against the installed transformers.

Ergo is left out on purpose: transformers keeps its router weight in float32 (``mlp.gate.linear.weight``) but rounds
it to the input's dtype at every call (``ErgoLinearWithFP32Output``: ``weight.to(hidden_states.dtype)``, then float32
products), which the gate weight in the load dtype computes exactly.
"""

from __future__ import annotations

#: strict: bfloat16 and float16 loads
BOTH = ("bfloat16", "float16")

#: config.json model_type -> load dtypes (torch dtype names) in which the router gate's weight stays float32
GATE_FP32_DTYPES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys((
        "axk1", "axk2", "bailing_hybrid", "beam", "deepseek_ocr2", "deepseek_ocr2_text", "deepseek_v2", "deepseek_v3",
        "deepseek_v32", "dots1", "dots3_note", "dots3_note_text", "ernie4_5_moe", "exaone_moe", "flint", "glm4_moe",
        "glm4_moe_lite", "glm4v_moe", "glm4v_moe_text", "glm5_next", "glm5_next_text", "glm_moe_dsa", "hy_v3", "hy_v4",
        "hy_v4_vl", "hy_v4_vl_text", "inkling2", "inkling2_loop", "inkling2_loop_text", "inkling2_text",
        "kimi_k25", "kimi_linear", "mimo_v2_flash", "minicpm5_moe", "mistral_large4", "mistral_large4_text",
        "muse_spark", "muse_spark_text", "nemotron_h", "param2moe", "solar_open", "unlimited_ocr",
        "unlimited_ocr_text",
        # Kimi-K2's config.json (kimi_k2): transformers reads it as DeepseekV3Config (Kimi-K2.5's text_config)
        "kimi_k2",
        # not in _keep_in_fp32_modules: HunYuanMoEV1Gate creates gate.wg in float32 (dtype=torch.float32)
        "hunyuan_v1_moe",
    ), BOTH),
    "longcat_flash": ("float16",),  # _keep_in_fp32_modules = ["classifier.weight"] (router.classifier)
}


def gate_fp32_dtypes(model_type) -> tuple[str, ...]:
    """The load dtypes in which ``model_type``'s router gate weight is float32 (``()``: none)."""
    return GATE_FP32_DTYPES.get(model_type, ())
