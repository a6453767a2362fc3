"""Round 61's review of its own fixes: what they refused that is valid, and the cases they missed."""

import dataclasses
import os
import sys

import numpy as np
import pytest
import torch

import moekit
from moekit.experts.placement import ExpertPlacement
from moekit.parallel import imbalance, local_physical_ids, plan_weight_moves, rank_loads

E, K, H, I = 4, 2, 16, 8


def test_fp8_shared_expert_buffers_load_through_load_weights():
    # the edge: the loader's new "no float8 into a float parameter" check refused a QuantSharedMLP's own e4m3 buffers
    from moekit.loading.quant_shared import QuantSharedMLP
    fp8 = {"quant_method": "fp8", "weight_block_size": [32, 32], "activation_scheme": "dynamic"}
    fmt = moekit.parse_quant_config(fp8)

    def layer(seed):
        g = torch.Generator().manual_seed(seed)
        q13, q2, s13, s2 = moekit.quantize_experts(torch.randn(1, 64, 32, generator=g) / 6,
                                                   torch.randn(1, 32, 32, generator=g) / 6, fmt)
        torch.manual_seed(seed)
        out = moekit.FusedMoE(E, K, 32, 32, backend="torch", shared_experts=QuantSharedMLP(fmt, q13, q2, s13, s2))
        out.load_expert_weights(torch.randn(E, 64, 32), torch.randn(E, 32, 32))
        return out

    a, b = layer(0), layer(1)
    b.load_weights(list(a.state_dict().items()))
    x, lg = torch.randn(3, 32), torch.randn(3, E)
    torch.testing.assert_close(b(x, lg), a(x, lg), rtol=0, atol=0)


def test_state_dict_with_a_permuted_placement_refused_without_eplb():
    # the edge: a rebalanced layer's state dict (slots permuted, the placement saved) loaded into a layer without EPLB
    # took the placement while the router kept sending expert e to slot e (28.8 off)
    torch.manual_seed(0)
    a, b = moekit.FusedMoE(E, K, H, I, backend="torch"), moekit.FusedMoE(E, K, H, I, backend="torch")
    a.load_expert_weights(torch.randn(E, 2 * I, H), torch.randn(E, H, I))
    b.load_expert_weights(torch.randn(E, 2 * I, H), torch.randn(E, H, I))
    sd = dict(a.state_dict())
    pre = next(k for k in sd if k.endswith("w13_weight")).rsplit("w13_weight", 1)[0]
    perm = [1, 0, 2, 3]
    for name in ("w13_weight", "w2_weight"):
        sd[pre + name] = sd[pre + name][perm].clone()
    sd[pre + "eplb_physical_to_logical"] = torch.tensor(perm)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    with pytest.raises(ValueError, match="eplb_physical_to_logical has physical_to_logical .*without EPLB routing"):
        b.load_state_dict(sd)
    assert all(torch.equal(v, before[k]) for k, v in b.state_dict().items())  # nothing copied
    sd[pre + "eplb_physical_to_logical"] = torch.arange(E)  # the identity: loads
    b.load_state_dict(sd)


def test_eplb_map_keeps_dead_ids_dead():
    # the edge: a custom routing's out-of-range id, made dead (-1) on the kernel path, indexed expert E - 1's replicas
    from moekit.ops.kernels import _torch_kernels
    from moekit.parallel.eplb_state import EplbState
    from moekit.routing.custom import CustomRoutingRouter
    kern = dataclasses.replace(_torch_kernels(), checks_values=False)

    def fn(h, logits, top_k, renorm):
        return torch.full((h.shape[0], top_k), 0.5), torch.tensor([[0, E + 1]] * h.shape[0], dtype=torch.int64)

    for eplb in (None, EplbState(ExpertPlacement.build(E))):
        router = CustomRoutingRouter(K, E, eplb_state=eplb, custom_routing_function=fn, kernels=kern)
        assert router.route(torch.randn(3, H), torch.randn(3, E)).topk_ids[0].tolist() == [0, -1]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.uint32, torch.uint64])
def test_custom_ids_of_other_integer_dtypes(dtype):
    # the edge: uint64 ids failed in the new range check ("lt_cpu" not implemented for 'UInt64')
    from moekit.ops.kernels import _torch_kernels
    from moekit.routing.custom import CustomRoutingRouter
    kern = dataclasses.replace(_torch_kernels(), checks_values=False)

    def fn(h, logits, top_k, renorm):
        return torch.full((h.shape[0], top_k), 0.5), torch.tensor([[0, 3]] * h.shape[0], dtype=dtype)

    router = CustomRoutingRouter(K, E, custom_routing_function=fn, kernels=kern)
    assert router.route(torch.randn(2, H), torch.randn(2, E)).topk_ids.tolist() == [[0, 3], [0, 3]]


def test_pure_functions_take_numpy_ints():
    # the edge: the new EP size / rank check took only Python ints (the EPLB helpers take numbers.Integral)
    two, one = np.int64(2), np.int64(1)
    assert [float(v) for v in rank_loads([1, 2, 3, 4], [0, 1, 2, 3], two, "linear")] == [3.0, 7.0]
    assert imbalance([1, 2, 3, 4], [0, 1, 2, 3], two, "linear") == pytest.approx(1.4)
    assert len(plan_weight_moves([0, 1, 2, 3], [1, 0, 2, 3], two, "linear")) == 2
    assert local_physical_ids(4, two, one, "linear") == (2, 3)


def test_grouped_backward_groups_capped_by_workspaces(monkeypatch):
    # the edge: bounded by the weight gradients' bytes alone, a group's float32 row buffers reached every local
    # expert's weight-gradient size (DeepSeek-V3, T = 16384: 21 GiB); now at most GROUP_WORKSPACES workspaces too
    from moekit.ops import experts_grad_grouped as g
    from moekit.ops.experts_grad import experts_backward
    calls = []
    real = g._chunk
    monkeypatch.setattr(g, "_chunk", lambda *a, **kw: calls.append(a[3].shape[0]) or real(*a, **kw))
    torch.manual_seed(0)
    t, e, h, i = 16, 8, 16, 16
    x, dy = torch.randn(t, h).bfloat16(), torch.randn(t, h).bfloat16()
    w13, w2 = torch.randn(e, 2 * i, h).bfloat16(), torch.randn(e, h, i).bfloat16()
    ids = torch.stack([torch.randperm(e)[:2] for _ in range(t)]).int()
    w = torch.rand(t, 2)
    rb = g._row_bytes(w13, w2)

    def run(workspaces):
        calls.clear()
        monkeypatch.setattr(g, "GROUP_WORKSPACES", workspaces)
        out = experts_backward(dy, x, w, ids, stacks_of=lambda a, b, dt: (w13[a:b], w2[a:b]), shapes=(e, 2 * i, h, i),
                               activation="silu", need=(True, True, True, True, False, False), workspace_bytes=2 * rb,
                               grouped=True)
        return list(calls), out

    (wide, a), (narrow, b) = run(1000), run(1)
    assert g._grad_rows(w13, w2) > 2  # (the weight gradients' bound exceeds one workspace's 2 rows)
    assert max(wide) > 2 and max(narrow) <= 2 and len(narrow) > len(wide)
    for p, q in zip(a, b):
        if p is not None:
            assert (p.float() - q.float()).abs().max() <= 1e-2 * p.float().abs().max()  # (bf16: one rounding vs a sum)


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="no float8")
def test_patch_keeps_models_whose_plan_runs_other_values_by_design():
    # the edges: PhiMoE's sparsemixer routes 2 whatever top_k says; Cohere2-MoE's softmax selection renormalises
    # whatever norm_topk_prob says: the block's attribute differs from the plan, not from the config: not an edit
    pytest.importorskip("transformers")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "integrations"))
    import hf_tiny_archs
    from moekit.integrations.transformers import patch
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    for arch, over in (("cohere2_moe", dict(norm_topk_prob=False)), ("phimoe", dict(num_experts_per_tok=3))):
        model = hf_tiny_archs.build(arch, **over).eval()
        with torch.no_grad():
            want = model(ids).logits
        assert patch(model)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)
