"""Architecture mismatches found by round 46's fuzzing of transformers' MoE blocks against moekit's layers (patched
and loaded from a saved checkpoint), each a tiny random transformers model compared block for block in float32."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit import load_moe_layers  # noqa: E402
from moekit.integrations.transformers import patch  # noqa: E402
from moekit.loading.architectures import plan_layers  # noqa: E402


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5 if p.dim() > 1 else 4))
    return model.eval()


def _compare(model, block_path, tmp_path, h):
    """max |patched - transformers|, max |loaded - transformers|, max |transformers| for one block."""
    block = copy.deepcopy(model.get_submodule(block_path))
    x = torch.randn(1, 5, h, generator=torch.Generator().manual_seed(1))
    model.save_pretrained(tmp_path)
    layer = load_moe_layers(tmp_path)[block_path]
    patch(model)
    with torch.no_grad():
        ref = block(x)
        ref = ref[0] if isinstance(ref, tuple) else ref
        a = model.get_submodule(block_path)(x)
        a = a[0] if isinstance(a, tuple) else a
        b = layer(x.reshape(5, h)).reshape(ref.shape)
    return (a - ref).abs().max().item(), (b - ref).abs().max().item(), ref.abs().max().item()


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh"])
def test_shared_experts_run_hidden_act(act, tmp_path):
    # the shared expert ran SiLU whatever hidden_act said (LayerPlan.shared_activation defaulted to "silu" in the
    # DeepSeek, Qwen2/3-Next, GLM, Llama 4 ... plans): 7-19 % of the largest output off, silently
    cfg = transformers.DeepseekV3Config(
        vocab_size=96, hidden_size=32, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=2,
        n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=1,
        topk_group=1, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, hidden_act=act)
    plans = plan_layers(cfg.to_dict())[1]
    assert {(p.activation, p.shared_activation) for p in plans} == {("gelu" if act == "gelu" else "gelu_tanh",) * 2}
    patched, loaded, scale = _compare(_randomise(transformers.DeepseekV3ForCausalLM(cfg)), "model.layers.1.mlp",
                                      tmp_path, 32)
    assert patched <= 1e-5 * scale and loaded <= 1e-5 * scale


@pytest.mark.parametrize("model_type", ["qwen2_moe", "glm4_moe", "llama4_text"])
def test_shared_activation_follows_hidden_act_in_other_families(model_type):
    cfg = transformers.CONFIG_MAPPING[model_type](hidden_act="gelu").to_dict()
    plans = plan_layers(cfg)[1]
    assert plans and all(p.shared_activation == "gelu" for p in plans)


@pytest.mark.parametrize("inter, hub_layout", [(16, False), (24, False), (24, True)])
def test_qwen3_vl_square_gate_up_reads_as_transformers_does(inter, hub_layout, tmp_path):
    # 2 · moe_intermediate_size == hidden_size makes gate_up_proj square: transformers 5 saves it [E, 2I, H] and its
    # from_pretrained keeps a tensor whose shape already fits; moekit read a square one transposed (the Hub's
    # [E, H, 2I] order). Non-square stacks load in either order (hub_layout: the files' stacks transposed).
    from safetensors.torch import load_file, save_file
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextModel

    cfg = transformers.CONFIG_MAPPING["qwen3_vl_moe_text"](
        vocab_size=96, hidden_size=32, intermediate_size=40, moe_intermediate_size=inter, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 2]))
    model = _randomise(Qwen3VLMoeTextModel(cfg))
    model.save_pretrained(tmp_path)
    if hub_layout:
        (path,) = tmp_path.glob("*.safetensors")
        tensors = load_file(path)
        save_file({k: v.transpose(1, 2).contiguous() if k.endswith(("gate_up_proj", "down_proj")) else v
                   for k, v in tensors.items()}, path, metadata={"format": "pt"})
    layer = load_moe_layers(tmp_path)["model.layers.0.mlp"]
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model.layers[0].mlp(x[None]).reshape(5, 32)
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_bias", [True, False])
def test_lfm2_renormalises_as_transformers(use_bias, tmp_path, monkeypatch):
    # transformers' LFM2-MoE router divides by Σw + 1e-6; moekit's bias router divides by Σw: 2 % off on tokens whose
    # selected sigmoid scores sum to ~5e-5 (negative logits). A named routing now does what transformers does.
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import hf_tiny13

    cfg_type, cls_name, over = hf_tiny13.TINY13["lfm2_moe"]
    monkeypatch.setitem(hf_tiny13.TINY13, "lfm2_moe", (cfg_type, cls_name, dict(over, use_expert_bias=use_bias)))
    m = hf_tiny13.build("lfm2_moe")
    blk = m.model.layers[1].feed_forward
    with torch.no_grad():
        blk.gate.weight.copy_(-blk.gate.weight.abs() * 2.0)  # negative logits for x >= 0: small sigmoid scores
        if use_bias:
            blk.expert_bias.copy_(torch.randn(blk.expert_bias.shape, generator=torch.Generator().manual_seed(3)))
    ref = copy.deepcopy(blk)
    m.save_pretrained(tmp_path)
    loaded = load_moe_layers(tmp_path)["model.layers.1.feed_forward"]
    patch(m)
    x = torch.randn(1, 64, m.config.hidden_size, generator=torch.Generator().manual_seed(0)).abs()
    with torch.no_grad():
        r = ref(x)
        torch.testing.assert_close(m.model.layers[1].feed_forward(x), r, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loaded(x.reshape(64, -1)).reshape(r.shape), r, rtol=1e-5, atol=1e-6)


def test_ernie_norm_floor_above_the_released_one_is_refused():
    # transformers divides ERNIE-4.5's weights by max(Σw, moe_norm_min): with the released 1e-12 that never differs
    # from Σw for sums of softmax scores a router can pick in practice; a larger floor is refused, not ignored
    cfg = transformers.CONFIG_MAPPING["ernie4_5_moe"](moe_norm_min=0.5).to_dict()
    with pytest.raises(NotImplementedError, match="moe_norm_min = 0.5"):
        plan_layers(cfg)
    assert plan_layers(transformers.CONFIG_MAPPING["ernie4_5_moe"]().to_dict())[1]


def test_zero_shared_experts(tmp_path):
    # n_shared_experts = 0: transformers builds an empty shared MLP ([0, H] weights) that adds nothing; patch() refused
    # its tensors ("no place in the moekit layer") and load_moe_layers raised KeyError on them
    cfg = transformers.DeepseekV3Config(
        vocab_size=96, hidden_size=32, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=2,
        n_routed_experts=4, n_shared_experts=0, num_experts_per_tok=2, first_k_dense_replace=1, n_group=1,
        topk_group=1, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
    patched, loaded, scale = _compare(_randomise(transformers.DeepseekV3ForCausalLM(cfg)), "model.layers.1.mlp",
                                      tmp_path, 32)
    assert patched <= 1e-5 * scale and loaded <= 1e-5 * scale


@pytest.mark.parametrize("model_type", ["aria_text", "nemotron_h", "ernie4_5_moe"])
def test_mlp_bias_shared_experts(model_type, tmp_path):
    # mlp_bias=True (ERNIE: use_bias) puts a bias on every linear of the shared MLP (Aria, Nemotron-H, ERNIE-4.5;
    # Nemotron-H's latent projections too, covered by hf_tiny13's nemotron_h_latent_bias): refused with
    # NotImplementedError until round 48
    if model_type == "aria_text":
        from transformers.models.aria.modeling_aria import AriaTextForCausalLM as cls

        cfg = transformers.CONFIG_MAPPING["aria_text"](
            vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, moe_num_experts=6, moe_topk=2, moe_num_shared_experts=1, mlp_bias=True)
        path = "model.layers.0.mlp"
    elif model_type == "ernie4_5_moe":  # its use_bias: the shared MLP (and attention, lm_head), not the experts
        from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeForCausalLM as cls

        cfg = transformers.CONFIG_MAPPING["ernie4_5_moe"](
            vocab_size=96, hidden_size=32, intermediate_size=40, moe_intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, moe_num_experts=6, moe_k=2,
            moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_interval=1, use_bias=True)
        path = "model.layers.1.mlp"
    else:
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHForCausalLM as cls

        cfg = transformers.CONFIG_MAPPING["nemotron_h"](
            vocab_size=96, hidden_size=32, num_hidden_layers=2, layers_block_type=["attention", "moe"],
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, n_routed_experts=6, num_experts_per_tok=2,
            moe_intermediate_size=16, moe_shared_expert_intermediate_size=24, n_group=1, topk_group=1,
            mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=1, chunk_size=16, mlp_bias=True)
        path = "backbone.layers.1.mixer" if hasattr(cls(cfg), "backbone") else "model.layers.1.mixer"
    plans = plan_layers(cfg.to_dict())[1]
    assert plans and all(p.shared_bias for p in plans)
    model = _randomise(cls(cfg))
    shared = model.get_submodule(path).shared_experts
    assert shared.down_proj.bias is not None and shared.down_proj.bias.abs().max() > 0  # the biases are in play
    patched, loaded, scale = _compare(model, path, tmp_path, 32)
    assert patched <= 1e-5 * scale and loaded <= 1e-5 * scale
    # quantised on load: the routed experts run fp8, the biased shared MLP stays full precision (QuantSharedMLP has
    # no biases), with its biases loaded
    from moekit.loading.modules import SharedMLP

    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [8, 8]}
    layer = load_moe_layers(tmp_path, quant_config=fp8)[path]
    assert layer.routed_experts.quant is not None and isinstance(layer.shared_experts, SharedMLP)
    assert torch.equal(layer.shared_experts.down_proj.bias, shared.down_proj.bias)
