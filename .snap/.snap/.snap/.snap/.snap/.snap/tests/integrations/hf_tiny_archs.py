"""Tiny random transformers models for the architectures of issue #13 (one shared builder).

Each entry: model_type -> (model class name, config overrides). The config class is transformers'
``CONFIG_MAPPING[config type]`` (the config type is the model type unless ``CONFIG_TYPE`` says otherwise);
widths are tiny (hidden 32, 2 layers, 4-8 experts, expert I = 24 so that 2I != H) and the model is fp32
with transformers' eager experts (the reference). Types missing from the installed transformers are
reported by :func:`missing` so tests can skip them.
"""

from __future__ import annotations

import importlib

H, I, E, K = 32, 24, 6, 2
BASE = dict(vocab_size=96, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
QWEN = dict(moe_intermediate_size=I, shared_expert_intermediate_size=20, intermediate_size=40, num_experts=E,
            num_experts_per_tok=K)
LINEAR = dict(layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4, linear_num_key_heads=2,
              linear_key_head_dim=8, linear_value_head_dim=8)
MROPE = dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 2]))
DSV2 = dict(moe_intermediate_size=I, intermediate_size=40, n_routed_experts=E, n_shared_experts=1, num_experts_per_tok=K,
            mlp_layer_types=["dense", "sparse"], topk_method="greedy", n_group=1, topk_group=1,
            routed_scaling_factor=1.5, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
MIX = dict(intermediate_size=I, num_local_experts=E, num_experts_per_tok=K)

TINY = {
    "minimax": ("MiniMaxForCausalLM", dict(MIX, layer_types=["linear_attention", "full_attention"], block_size=4)),
    "phimoe": ("PhimoeForCausalLM", dict(MIX)),
    "jamba": ("JambaForCausalLM", dict(intermediate_size=I, num_experts=E, num_experts_per_tok=K, attn_layer_period=2,
                                       attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                                       use_mamba_kernels=False, mamba_d_state=8, mamba_dt_rank=8)),
    "hunyuan_v1_moe": ("HunYuanMoEV1ForCausalLM", dict(intermediate_size=I, num_experts=E, moe_topk=K)),
    "cohere2_moe": ("Cohere2MoeForCausalLM", dict(intermediate_size=I, num_experts=E, num_experts_per_tok=K,
                                                  num_shared_experts=1, mlp_layer_types=["sparse", "sparse"],
                                                  dense_intermediate_size=40, sliding_window=16)),
    "granitemoe": ("GraniteMoeForCausalLM", dict(MIX)),
    "granitemoeshared": ("GraniteMoeSharedForCausalLM", dict(MIX, shared_intermediate_size=20)),
    "granitemoe_swa": ("GraniteMoeSWAForCausalLM", dict(MIX, shared_intermediate_size=20, sliding_window=16)),
    "granitemoehybrid": ("GraniteMoeHybridForCausalLM", dict(
        MIX, shared_intermediate_size=20, layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=16,
        mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=16, use_mamba_kernels=False)),
    "qwen3_5_moe": ("Qwen3_5MoeForCausalLM", dict(QWEN, **LINEAR)),
    "qwen3_vl_moe": ("Qwen3VLMoeTextModel", dict(QWEN, decoder_sparse_step=1, **MROPE)),
    "qwen3_omni_moe": ("Qwen3OmniMoeThinkerTextModel", dict(QWEN, norm_topk_prob=False, **MROPE)),
    "qwen4_exp": ("Qwen4ExpForCausalLM", dict(
        QWEN, **dict(LINEAR, layer_types=["linear_attention", "full_attention"]), hc_lowrank=8, ple_layer_ids=[],
        ple_embed_dim=8, ngram_vocab_size_base=512, make_ngram_vocab_size_divisible_by=8, split_ngram_parts=4,
        indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=8, indexer_compress_ratio=2)),
    "mellum": ("MellumForCausalLM", dict(QWEN, num_local_experts=E, mlp_layer_types=["dense", "sparse"])),
    "flex_olmo": ("FlexOlmoForCausalLM", dict(intermediate_size=I, num_experts=E, num_experts_per_tok=K)),
    "lara_mini": ("LaraMiniForCausalLM", dict(QWEN, **LINEAR)),
    "flint": ("FlintForCausalLM", dict(QWEN, decoder_sparse_step=1, mlp_only_layers=[0])),
    "ernie4_5_moe": ("Ernie4_5_MoeForCausalLM", dict(
        moe_intermediate_size=I, intermediate_size=40, moe_num_experts=E, moe_k=K, moe_num_shared_experts=1,
        moe_layer_start_index=1, moe_layer_interval=1)),
    "deepseek_ocr2": ("DeepseekOcr2TextModel", dict(DSV2)),
    "unlimited_ocr": ("UnlimitedOcrTextModel", dict(DSV2)),
    "openai_privacy_filter": ("OpenAIPrivacyFilterForTokenClassification", dict(MIX, sliding_window=16)),
    "dbrx": ("DbrxForCausalLM", dict(
        d_model=H, n_heads=4, n_layers=2, max_seq_len=64, attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=I, moe_num_experts=E, moe_top_k=K, ffn_act_fn={"name": "silu"},
                        moe_normalize_expert_weights=1.0))),
    "jetmoe": ("JetMoeForCausalLM", dict(MIX, kv_channels=8, num_key_value_heads=4)),
    "aria": ("AriaTextForCausalLM", dict(intermediate_size=I, moe_num_experts=E, moe_topk=K, moe_num_shared_experts=1)),
}
CONFIG_TYPE = {"qwen3_5_moe": "qwen3_5_moe_text", "qwen3_vl_moe": "qwen3_vl_moe_text",
               "qwen3_omni_moe": "qwen3_omni_moe_text", "qwen4_exp": "qwen4_exp_text", "aria": "aria_text",
               "deepseek_ocr2": "deepseek_ocr2_text", "unlimited_ocr": "unlimited_ocr_text"}
#: the block path of the model's first MoE layer in its multimodal wrapper (for the wrapper-checkpoint test)
WRAPPED = {"qwen3_vl_moe": "model.language_model.layers", "qwen3_omni_moe": "thinker.model.language_model.layers",
           "deepseek_ocr2": "model.language_model.layers", "aria": "model.language_model.layers"}


def config_type(model_type: str) -> str:
    return CONFIG_TYPE.get(model_type, model_type)


def missing(model_type: str) -> str | None:
    """Why the installed transformers cannot build ``model_type`` (None when it can)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if config_type(model_type) not in CONFIG_MAPPING_NAMES:
        import transformers

        return f"model type {config_type(model_type)!r} is not in transformers {transformers.__version__}"
    return None


def _model_class(model_type: str, name: str):
    import transformers
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    if hasattr(transformers, name):
        return getattr(transformers, name)
    mod = model_type_to_module_name(config_type(model_type))
    return getattr(importlib.import_module(f"transformers.models.{mod}.modeling_{mod}"), name)


def build(model_type: str, seed: int = 0, **overrides):
    """A random fp32 model of ``model_type`` with eager experts (the reference)."""
    import torch
    from transformers import CONFIG_MAPPING

    from hf_tiny import _randomise

    name, kw = TINY[model_type]
    cls = CONFIG_MAPPING[config_type(model_type)]
    kwargs = {k: v for k, v in BASE.items() if model_type != "dbrx"}
    kwargs.update(kw)
    kwargs.update(overrides)
    config = cls(**kwargs)
    torch.manual_seed(seed)
    model = _model_class(model_type, name)(config).float().eval()
    _randomise(model, seed)
    try:
        model.set_experts_implementation("eager")
    except Exception:  # no decorated experts class (DBRX, JetMoE)
        pass
    return model
