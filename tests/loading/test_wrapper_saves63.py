"""Round 63: multimodal wrappers saved by transformers' own ``save_pretrained`` load with ``load_moe_layers``.

transformers (5.25) writes a wrapper's checkpoint in the Hub's original key layout, through the reverse of its
``conversion_mapping.py``, and reloads it; moekit read only the layout of the modules in memory:

- Kimi-K2.5 (``kimi_k25``): the generic ``blocks`` -> ``layers`` rename saves ``language_model.model.blocks.N.mlp``;
- MiniMax-M3-VL (``minimax_m3_vl``): the selection bias on the block (``block_sparse_moe.e_score_correction_bias``)
  and the shared MLP's ``gate_proj`` / ``up_proj`` apart (transformers fuses them into ``gate_up_proj``);
- Step-3.7 (``step3p7``): ``layers.N.moe.{gate.weight, router_bias}``, stacked ``moe.{gate,up}_proj.weight``
  ``[E, I, H]`` and ``moe.down_proj.weight`` ``[E, H, I]``, and the shared MLP at ``layers.N.share_expert``.

Each case builds a tiny random wrapper (fp32), saves it with ``save_pretrained`` (and, for the layout moekit read
before, its ``state_dict`` as is), loads the MoE layers and compares each with the transformers block on the same
hidden states.
"""

from __future__ import annotations

import json

import pytest
import torch

from moekit import load_moe_layers

transformers = pytest.importorskip("transformers")

_TEXT = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, max_position_embeddings=128, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)
_VISION = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)

#: wrapper model_type -> (text config, vision config, wrapper config keywords)
CASES = {
    "kimi_k25": (dict(_TEXT, model_type="kimi_k2", intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                      n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16,
                      qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4),
                 dict(_VISION), dict(projection_hidden_size=32)),
    "minimax_m3_vl": (dict(_TEXT, model_type="minimax_m3_vl_text", intermediate_size=32, shared_intermediate_size=48,
                           num_local_experts=8, routed_scaling_factor=2.0),
                      dict(_VISION, image_size=56), dict(projector_hidden_size=32)),
    "step3p7": (dict(_TEXT, model_type="step3p5", intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                     num_hidden_layers=3, mlp_layer_types=["dense", "sparse", "sparse"], share_expert_dim=48,
                     swiglu_limits=[0.0, 0.0, 0.3], swiglu_limits_shared=[0.0, 0.2, 0.0], sliding_window=16),
                dict(_VISION, image_size=56), {}),
}


def _build(wrapper: str):
    from transformers import CONFIG_MAPPING, AutoModel, AutoModelForImageTextToText

    if wrapper not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {wrapper}")
    text, vision, extra = CASES[wrapper]
    cfg = CONFIG_MAPPING[wrapper](text_config=dict(text), vision_config=dict(vision), **extra)
    torch.manual_seed(0)
    try:
        model = AutoModelForImageTextToText.from_config(cfg)
    except ValueError:  # (a wrapper without an image-text-to-text head)
        model = AutoModel.from_config(cfg)
    model = model.float().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial values everywhere: router biases included (transformers zeros them)
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if not p.is_floating_point() or "inv_freq" in name:
                continue
            if name.endswith("e_score_correction_bias"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.2)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / (p.shape[-1] if p.dim() > 1 else 16) ** 0.5)
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    return model


def _save_in_memory_layout(model, path) -> None:
    """The layout moekit read before round 63: the modules' own names (fused stacks, bias under ``gate.``)."""
    from safetensors.torch import save_file

    path.mkdir()
    (path / "config.json").write_text(json.dumps(model.config.to_dict()))
    save_file({k: v.detach().clone() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))


def _check(model, layers: dict) -> None:
    assert layers, "no MoE layer loaded"
    h = model.config.text_config.hidden_size
    x = torch.randn(1, 7, h, generator=torch.Generator().manual_seed(3))
    for name, layer in layers.items():
        block = model.get_submodule(name)
        with torch.no_grad():
            ref = block(x)
            ref = (ref[0] if isinstance(ref, tuple) else ref).reshape(7, h)
            out = layer(x.reshape(7, h))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("wrapper", sorted(CASES))
def test_wrapper_saved_by_transformers_loads(wrapper, tmp_path):
    """transformers' own save (the Hub's original layout) loads, and each layer computes the block's output."""
    model = _build(wrapper)
    model.save_pretrained(tmp_path)
    _check(model, load_moe_layers(tmp_path, progress=False))


@pytest.mark.parametrize("wrapper", sorted(CASES))
def test_wrapper_in_memory_layout_still_loads(wrapper, tmp_path):
    """The modules' own names (what moekit read before: fused shared gate_up_proj, stacked gate_up_proj) still load."""
    model = _build(wrapper)
    _save_in_memory_layout(model, tmp_path / "mem")
    _check(model, load_moe_layers(tmp_path / "mem", progress=False))
