"""Round 62's training audit: dead slots in the experts' backward (an id outside the expert map read the map's last
entry; an id past the experts made a bincount as long as the id), and compiled training through a rounding (the
zero-expert combine's twin) that had no autograd formula."""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.ops.experts_grad import experts_backward

E, H, I = 4, 16, 8
NEED_ALL = (True, True, True, True, True, True)
PATHS = {"grouped": (True, True), "loop": (False, True), "traced": (True, False), "masked": (False, False)}


def _ref(x, w, ids, w13, w2, emap, num_local):
    """float64 per-slot loop; a slot whose id is outside the map or the local experts adds nothing."""
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros(x.shape[1], dtype=torch.float64)
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if emap is not None:
                e = int(emap[e]) if 0 <= e < len(emap) else -1
            if not 0 <= e < num_local:
                continue
            h = w13[e] @ x[t]
            acc = acc + w[t, j] * (w2[e] @ (torch.nn.functional.silu(h[:I]) * h[I:]))
        rows.append(acc)
    return torch.stack(rows)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mapped", [True, False], ids=["map", "no-map"])
def test_dead_slots_add_no_gradient(path, mapped, monkeypatch):
    # the edges: ids -1 and E with a map (-1 read the map's last entry, E raised IndexError); without a map an id of
    # 2^28 (a bincount of 2^28 + 1 entries: 2 GiB); expert 3 reached by no live slot (its weight gradients are 0)
    grouped, host = PATHS[path]
    monkeypatch.setattr("moekit.ops.experts_grad.host_sync_allowed", lambda: host)
    torch.manual_seed(0)
    x, w = torch.randn(4, H), torch.rand(4, 2)
    w13, w2 = torch.randn(E, 2 * I, H) * 0.3, torch.randn(E, H, I) * 0.3
    dead = [-1, E] if mapped else [2**28, E]
    ids = torch.tensor([[0, dead[0]], [1, 2], [2, dead[1]], [0, 1]], dtype=torch.int64)
    emap = torch.arange(E, dtype=torch.int32) if mapped else None
    dy = torch.randn(4, H)
    got = experts_backward(dy, x, w, ids.to(torch.int32) if mapped else ids,
                           stacks_of=lambda a, b, dt: (w13[a:b].to(dt), w2[a:b].to(dt)), shapes=(E, 2 * I, H, I),
                           activation="silu", on_input=False, w1_bias=None, w2_bias=None, expert_map=emap,
                           need=(True, True, True, True, False, False), expert_chunk=None, workspace_bytes=1 << 28,
                           grouped=grouped)
    leaves = [v.detach().double().requires_grad_() for v in (x, w, w13, w2)]
    _ref(leaves[0], leaves[1], ids, leaves[2], leaves[3], emap, E).backward(dy.double())
    for name, g, leaf in zip(("dx", "dw", "dW13", "dW2"), got, leaves):
        torch.testing.assert_close(g.double(), leaf.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert got[1][0, 1] == 0 and got[1][2, 1] == 0 and got[2][3].abs().max() == 0


@pytest.mark.parametrize("kw", [dict(routed_scaling_factor=2.5, apply_routed_scale_to_output=True),
                                dict(zero_expert_type="identity", renormalize=False)],
                         ids=["scale-on-output", "zero-experts"])
def test_compiled_bf16_training_through_the_zero_combine(kw):
    # the edge: the combine's gradient twin rounds through moekit::rounded, which had no autograd formula: a bf16
    # layer with the scale on the output or LongCat's zero experts failed to compile its backward
    torch.manual_seed(0)
    z = 2 if "zero_expert_type" in kw else 0
    extra = dict(e_score_correction_bias=torch.zeros(8 + z)) if z else {}
    layer = moekit.FusedMoE(8, 2, 32, 16, params_dtype=torch.bfloat16, backend="torch",
                            gate=torch.nn.Linear(32, 8 + z, bias=False, dtype=torch.bfloat16),
                            **{"renormalize": True, **kw, **extra})
    layer.load_expert_weights(torch.randn(8, 32, 32) * 0.2, torch.randn(8, 32, 16) * 0.2)
    x = torch.randn(6, 32, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().sum().backward()
    eager, x.grad = x.grad.clone(), None
    torch._dynamo.reset()
    torch.compile(layer, fullgraph=True, backend="aot_eager")(x).float().sum().backward()
    torch.testing.assert_close(x.grad, eager, rtol=0, atol=0)


def test_compiled_masked_backward_runs_in_bounded_chunks():
    # the edge: compiled / captured fp32 training ran every expert masked over all T·K slots in one chunk, whatever
    # the workspace; now power-of-two chunks under it (a 2 KiB workspace: 4 rows each), the same gradients as eager
    # over several token counts of one dynamic compile
    torch.manual_seed(0)
    w13, w2 = torch.randn(E, 2 * I, H) * 0.3, torch.randn(E, H, I) * 0.3
    seen = []

    def run(dy, x, w, ids):
        return experts_backward(dy, x, w, ids, stacks_of=lambda a, b, dt: (w13[a:b].to(dt), w2[a:b].to(dt)),
                                shapes=(E, 2 * I, H, I), activation="silu", on_input=False, w1_bias=None,
                                w2_bias=None, expert_map=None, need=(True, True, True, True, False, False),
                                expert_chunk=None, workspace_bytes=2048, grouped=False)[:4]

    import moekit.ops.experts_grad_grouped as grouped_mod
    real = grouped_mod.power_of_two_chunks

    def counted(n, rows):
        out = real(n, rows)
        seen.append((rows, out[0]))
        return out

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager", dynamic=True)
    for t in (5, 40):
        x, w, dy = torch.randn(t, H), torch.rand(t, 2), torch.randn(t, H)
        ids = torch.stack([torch.randperm(E)[:2] for _ in range(t)]).int()
        want = run(dy, x, w, ids)
        torch._dynamo.reset() if t == 5 else None
        import moekit.ops.experts_grad as eg
        eg.power_of_two_chunks, before = counted, eg.power_of_two_chunks
        try:
            got = compiled(dy, x, w, ids)
        finally:
            eg.power_of_two_chunks = before
        for name, a, b in zip(("dx", "dw", "dW13", "dW2"), got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"T={t} {name}")
    # traced with the workspace's bound (4 rows of this size) and in more than one chunk, not all T·K rows at once
    assert seen and max(r for r, _ in seen) <= 4 and max(c for _, c in seen) > 1
