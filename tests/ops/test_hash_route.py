"""Hash routing (``ids = hash_indices_table[input_ids]``) on both kernel tables: invalid input_ids
(issue #12 item 4) raise ``ValueError`` naming input_ids, the bad value and the valid range; while a CUDA
graph is captured (simulated here) the Triton table marks such tokens with NaN weights instead.

On CPU the Triton table runs under the Triton interpreter (``TRITON_INTERPRET=1``).
"""

import pytest
import torch

pytest.importorskip("triton")

import moekit
from moekit.ops import routing as routing_ops
from moekit.ops import triton_routing
from moekit.ops.kernels import kernels_for
from moekit.ops.routing import TopKSpec
from reference import ref_hash_route

DEV = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB, E, K = 11, 8, 2


def _case(t=5):
    g = torch.Generator().manual_seed(7)
    table = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(VOCAB)]).to(DEV)
    logits = torch.randn(t, E, generator=g).to(DEV)
    input_ids = torch.randint(0, VOCAB, (t,), generator=g).to(DEV)
    return logits, table, input_ids


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_hash_route_matches_reference(backend):
    logits, table, input_ids = _case()
    spec = TopKSpec(K, "sigmoid", True, 2.0)
    w, ids = kernels_for(backend).hash_route(logits, table, input_ids, spec, None)
    ref_w, ref_ids = ref_hash_route(logits.cpu(), table.cpu(), input_ids.cpu(), scoring_func="sigmoid",
                                    renormalize=True, routed_scaling_factor=2.0)
    assert ids.dtype == torch.int32 and torch.equal(ids.long().cpu(), ref_ids)
    torch.testing.assert_close(w.double().cpu(), ref_w, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bad", [-1, VOCAB])
def test_invalid_input_ids_raise(backend, bad):
    # -1 used to pick the table's last row silently, VOCAB raised a bare IndexError
    logits, table, input_ids = _case()
    input_ids[3] = bad
    with pytest.raises(ValueError, match=rf"input_ids must lie in \[0, {VOCAB}\).*got {bad}"):
        kernels_for(backend).hash_route(logits, table, input_ids, TopKSpec(K), None)
    with pytest.raises(ValueError, match=rf"input_tokens must lie in \[0, {VOCAB}\)"):  # the public front, its name
        moekit.fused_topk_bias(None, logits, None, K, False, input_tokens=input_ids, hash_indices_table=table,
                               backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_layer_invalid_input_ids_raise(backend):
    _, table, input_ids = _case(4)
    layer = moekit.FusedMoE(E, K, 16, 8, hash_indices_table=table, backend=backend, device=DEV)
    x, logits = torch.randn(4, 16, device=DEV), torch.randn(4, E, device=DEV)
    input_ids[0] = -1
    with pytest.raises(ValueError, match="input_ids"):
        layer(x, logits, input_ids=input_ids)


def test_triton_policy_while_capturing(monkeypatch):
    # no host synchronisation possible: the bad token keeps valid ids (row 0) and gets NaN weights
    # (round 63: both tables' hash routing reads the switch in moekit.ops.routing, hash_route_checked)
    monkeypatch.setattr(routing_ops, "host_sync_allowed", lambda: False)
    logits, table, input_ids = _case()
    input_ids[1], input_ids[4] = -1, VOCAB
    w, ids = triton_routing.hash_route_triton(logits, table, input_ids, TopKSpec(K, "softmax", True), None)
    assert torch.isnan(w[1]).all() and torch.isnan(w[4]).all()
    assert torch.isfinite(w[[0, 2, 3]]).all()
    assert torch.equal(ids[1].long(), table[0]) and torch.equal(ids[4].long(), table[0])
    assert ((ids >= 0) & (ids < E)).all()
