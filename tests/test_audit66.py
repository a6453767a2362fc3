"""Round 66's audit: defects found by review helpers (and the round's own checks) and reproduced; each case names the
edge it covers."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import moekit


def _nemotron_h(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CONFIG_MAPPING["nemotron_h"](
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        layers_block_type=["attention", "moe"], num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=16, moe_shared_expert_intermediate_size=24,
        n_group=1, topk_group=1, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=1, chunk_size=16)
    torch.manual_seed(0)
    transformers.NemotronHForCausalLM(cfg).save_pretrained(tmp_path)
    return tmp_path


def test_a_non_gated_expert_with_gate_and_up_keys_is_refused(tmp_path):
    # edge: a relu2 expert has one input projection (Nemotron-H: up_proj); a checkpoint holding gate_proj AND up_proj
    # for one expert is a gated one, and the second key silently overwrote the first (the load "succeeded")
    path = _nemotron_h(tmp_path)
    (f,) = path.glob("*.safetensors")
    t = load_file(f)
    (up,) = [k for k in t if k.endswith("experts.0.up_proj.weight")]
    t[up.replace("up_proj", "gate_proj")] = torch.randn_like(t[up])
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="expert 0 also has a up_proj key|expert 0 also has a gate_proj key"):
        moekit.load_moe_layers(str(path), progress=False)


def test_a_non_gated_layer_refuses_gate_and_up_in_load_weights():
    # edge: the same through layer.load_weights (one call), with w1 / w3 names as well
    layer = moekit.FusedMoE(4, 2, 8, 6, activation="relu2", params_dtype=torch.float32)
    for gate, up in (("gate_proj", "up_proj"), ("w1", "w3")):
        w = {f"experts.0.{gate}.weight": torch.randn(6, 8), f"experts.0.{up}.weight": torch.randn(6, 8)}
        with pytest.raises(ValueError, match="not gated"):
            layer.load_weights(w.items())
    # one input projection per expert still loads, under either name, and a reload of the same key is fine
    w = {f"experts.{e}.{'up_proj' if e % 2 else 'gate_proj'}.weight": torch.randn(6, 8) for e in range(4)}
    layer.load_weights(list(w.items()) * 2)
    for e, t in enumerate(w.values()):
        torch.testing.assert_close(layer.routed_experts.w13_weight[e], t)
