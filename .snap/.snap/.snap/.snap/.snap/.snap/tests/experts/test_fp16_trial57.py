"""Round 57's fp16 user trial: weights outside float16's range refused when loaded (they loaded as inf, and every
token routed to the expert came out non-finite), and the weight-only twin rounds a dequantised weight to float16 as
the kernels do (SPEC §8: the GEMM uses the dequantised weight in params_dtype; the int4 twin kept it in float32 and
sat 4e-4 from the Triton kernels)."""

import pytest
import torch

import moekit

E, K, H, I = 4, 2, 128, 64
INT4 = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
    "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                       "group_size": 32}}}}


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, 2 * I, H, generator=g) * H**-0.5, torch.randn(E, H, I, generator=g) * I**-0.5


@pytest.mark.parametrize("which", ["w13", "w2", "w13_bias", "w2_bias"])
def test_fp16_layer_refuses_weights_outside_its_range(which):
    # a finite value past 65504 in any expert tensor: ValueError naming it and the value, nothing half-loaded
    w13, w2 = _weights()
    b13, b2 = torch.zeros(E, 2 * I), torch.zeros(E, H)
    args = {"w13": w13, "w2": w2, "w13_bias": b13, "w2_bias": b2}
    args[which] = args[which].clone()
    args[which][1, 3, ...] = 1e5 if args[which].dim() == 3 else 7e4
    layer = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float16, has_bias=True).eval()
    layer.load_expert_weights(*_weights(1), b13, b2)  # a good load first: a refused one must leave it whole
    before = {k: v.clone() for k, v in layer.routed_experts.state_dict().items()}
    with pytest.raises(ValueError, match=rf"^{which} holds \d+ finite values outside float16's range.*(1e\+05|7e\+04)"):
        layer.load_expert_weights(args["w13"], args["w2"], args["w13_bias"], args["w2_bias"])
    after = layer.routed_experts.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())


def test_fp16_range_edge_values_load():
    # 65504 is float16's largest finite value (65519 rounds to it): loads; an inf the caller gives stays theirs;
    # bf16 / fp32 layers take any finite float32
    w13, w2 = _weights()
    w13[0, 0, 0], w13[0, 0, 1] = 65504.0, 65519.0
    w2[0, 0, 0] = float("inf")
    layer = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float16).eval()
    layer.load_expert_weights(w13, w2)
    assert layer.routed_experts.w13_weight[0, 0, :2].tolist() == [65504.0, 65504.0]
    w13[0, 0, 2] = 1e30
    moekit.FusedMoE(E, K, H, I, params_dtype=torch.bfloat16).eval().load_expert_weights(w13, w2)


def test_fp16_checkpoint_shard_and_state_dict_outside_range_are_refused():
    # the checkpoint path (one expert's shard at a time) and load_state_dict (float32 entries) check the same
    layer = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float16).eval()
    bad = torch.randn(I, H)
    bad[5, 7] = -2e5
    with pytest.raises(ValueError, match="outside float16's range.*2e\\+05"):
        layer.routed_experts.load_expert_shard(2, "w1", bad)
    src = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float32).eval()
    w13, w2 = _weights()
    w2[3, 0, 0] = 1e5
    src.load_expert_weights(w13, w2)
    with pytest.raises(ValueError, match="state dict entry 'routed_experts.w2_weight' holds 1 finite values"):
        layer.load_state_dict(src.state_dict())
    # an fp16 layer's own state dict (NaN "never written" markers included) loads into another fp16 layer
    fresh = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float16).eval()
    layer.load_state_dict(fresh.state_dict())


def test_fp16_meta_layer_takes_meta_tensors():
    # init_empty_weights-style loading: no values to check on the meta device
    layer = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float16, device="meta")
    layer.load_expert_weights(torch.empty(E, 2 * I, H, device="meta"), torch.empty(E, H, I, device="meta"))
    layer.routed_experts.load_expert_shard(0, "w2", torch.empty(H, I, device="meta"))


@pytest.mark.interpreter
def test_fp16_int4_twin_rounds_the_weight_like_the_kernels():
    # int4 group 32 with fp16 activations: q · s rounds in float16 (the kernels' operand); the twin used to keep the
    # float32 product, 3.7e-4 to 5.2e-4 relative RMS from the Triton kernels; now the same operand
    torch.manual_seed(14)
    w13, w2 = _weights(14)
    q = moekit.quantize_experts(w13, w2, INT4)
    x = torch.randn(32, H).half()
    logits = torch.randn(32, E)
    out = {}
    for backend in ("torch", "triton"):
        layer = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float16, backend=backend, quant_config=INT4).eval()
        layer.load_expert_weights(q[0], q[1], w13_scale=q[2], w2_scale=q[3])
        with torch.no_grad():
            out[backend] = layer(x, logits).float()
    rel = ((out["torch"] - out["triton"]).norm() / out["torch"].norm()).item()
    assert rel < 2e-5, rel
