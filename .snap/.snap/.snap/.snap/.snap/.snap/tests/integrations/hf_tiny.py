"""Tiny random transformers models, one per supported architecture (fp32, CPU, seconds to build).

Each entry: model_type -> (config class name, model class name, config kwargs). Widths are tiny
(hidden 32, 2-3 layers, 4-8 experts) so a forward takes milliseconds on 2 CPU cores.
"""

from __future__ import annotations

COMMON = dict(vocab_size=96, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

TINY = {
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            hidden_size=32,
            intermediate_size=40,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_hidden_layers=3,
            num_experts=6,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            hidden_size=32,
            intermediate_size=40,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            num_experts=8,
            num_experts_per_tok=3,
            norm_topk_prob=True,
            decoder_sparse_step=2,
            head_dim=8,
        ),
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        dict(
            hidden_size=32,
            intermediate_size=40,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_hidden_layers=2,
            num_experts=6,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            head_dim=8,
            linear_num_value_heads=2,
            linear_num_key_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            layer_types=["linear_attention", "full_attention"],
        ),
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(
            hidden_size=32,
            intermediate_size=40,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            n_routed_experts=8,
            n_shared_experts=2,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.5,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            num_key_value_heads=4,
        ),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            hidden_size=32,
            intermediate_size=40,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=3,
            first_k_dense_replace=1,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            num_key_value_heads=4,
        ),
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        dict(
            hidden_size=32,
            intermediate_size=40,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=1.5,
            norm_topk_prob=True,
            head_dim=8,
        ),
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2),
    ),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(
            hidden_size=32,
            intermediate_size=16,
            num_hidden_layers=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            head_dim=8,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=8,
        ),
    ),
    "llama4_text": (
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        dict(
            hidden_size=32,
            intermediate_size=16,
            intermediate_size_mlp=40,
            num_hidden_layers=2,
            num_local_experts=4,
            num_experts_per_tok=1,
            interleave_moe_layer_step=1,
            head_dim=8,
        ),
    ),
    "longcat_flash": (
        "LongcatFlashConfig",
        "LongcatFlashForCausalLM",
        dict(
            hidden_size=32,
            ffn_hidden_size=40,
            expert_ffn_hidden_size=16,
            num_layers=2,
            head_dim=8,
            n_routed_experts=6,
            zero_expert_num=2,
            moe_topk=3,
            routed_scaling_factor=2.0,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            num_key_value_heads=4,
        ),
    ),
    "deepseek_v4": (
        "DeepseekV4Config",
        "DeepseekV4ForCausalLM",
        dict(
            hidden_size=32,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            n_routed_experts=8,
            num_experts_per_tok=2,
            num_key_value_heads=1,
            head_dim=16,
            q_lora_rank=16,
            mlp_layer_types=["hash_moe", "moe", "moe"],
            routed_scaling_factor=1.5,
            swiglu_limit=10.0,
        ),
    ),
}


def build(model_type: str, seed: int = 0, **overrides):
    """A random fp32 model of ``model_type`` with the eager experts (the reference)."""
    import torch
    import transformers

    cfg_name, model_name, kw = TINY[model_type]
    kwargs = dict(COMMON)
    kwargs.update(kw)
    kwargs.update(overrides)
    config = getattr(transformers, cfg_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    model.float().eval()
    _randomise(model, seed)
    model.set_experts_implementation("eager") if hasattr(model, "set_experts_implementation") else None
    return model


def _randomise(model, seed: int) -> None:
    """Give every parameter and float buffer (router biases included) non-trivial random values."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if not p.is_floating_point() or "inv_freq" in name:
                continue
            if name.endswith("e_score_correction_bias"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.2)
            elif "norm" in name and p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else 16
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                e = b.max().item() + 1 if b.numel() else 1
                n = model.config.num_local_experts
                k = b.shape[1]
                rows = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(b.shape[0])])
                b.copy_(rows)
