"""moekit.ops.experts_grad.experts_backward, both of its paths (grouped GEMMs, the per-expert loop), against float64
autograd through a per-token loop: awkward shapes, chunk boundaries, an expert map with experts held elsewhere."""

from __future__ import annotations

import pytest
import torch
from reference import ref_act

from moekit.ops.experts_grad import experts_backward

NEED_ALL = (True, True, True, True, True, True)


def _ref(x, w, ids, w13, w2, b13, b2, activation, on_input, emap):
    out = torch.zeros(x.shape, dtype=torch.float64)
    rows = []
    for t in range(x.shape[0]):
        acc = out[t]
        for j in range(ids.shape[1]):
            e = int(emap[ids[t, j]]) if emap is not None else int(ids[t, j])
            if e < 0:
                continue
            xin = w[t, j] * x[t] if on_input else x[t]
            o = w2[e] @ ref_act(w13[e] @ xin + b13[e], activation) + b2[e]
            acc = acc + (o if on_input else w[t, j] * o)
        rows.append(acc)
    return torch.stack(rows) if rows else out


def _problem(t, k, e, h, inter, activation, dtype=torch.float32):
    rows = inter if activation == "relu2" else 2 * inter
    x = torch.randn(t, h).to(dtype)
    w = torch.rand(t, k)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)]) if t else torch.zeros(0, k, dtype=torch.int64)
    w13, w2 = (torch.randn(e, rows, h) * 0.3).to(dtype), (torch.randn(e, h, inter) * 0.3).to(dtype)
    b13, b2 = (torch.randn(e, rows) * 0.1).to(dtype), (torch.randn(e, h) * 0.1).to(dtype)
    return x, w, ids.to(torch.int32), w13, w2, b13, b2


# (T, K, E, H, I, activation, on_input, expert map, workspace bytes, expert_chunk): each row names its edge
CASES = [
    (7, 2, 5, 16, 12, "silu", False, None, 1 << 28, None),  # plain
    (1, 1, 3, 16, 4, "gelu", True, None, 1 << 28, None),  # T = 1, K = 1, the weight on the input
    (11, 4, 4, 8, 8, "relu2", False, None, 1 << 28, None),  # K = E, non-gated
    (13, 3, 6, 16, 12, "swigluoai", False, None, 2048, 2),  # rows chunked (tiny workspace), experts in groups of 2
    (9, 2, 8, 16, 12, "silu", False, "half", 1 << 28, None),  # an expert map: experts 4-7 held elsewhere
    (0, 2, 4, 16, 12, "silu", False, None, 1 << 28, None),  # T = 0
    (5, 2, 7, 16, 12, "silu", False, "hot", 1 << 28, 3),  # every slot on one expert; six get nothing (dW 0)
    # many rows for small weights: the traced path's power-of-two chunks (8 of 26 rows, 6 of them padding), half the
    # slots held elsewhere
    (101, 2, 8, 16, 8, "silu", False, "half", 2048, None),
    # round 60: one expert with more rows than a chunk holds (101 > the 77 rows of the weights' size): split, its
    # weight gradients summed in float32 (eager) / over chunks (traced); the six others in one group without rows
    (101, 2, 7, 16, 12, "silu", False, "hot", 2048, None),
]


# the four paths: grouped GEMMs and the per-expert loop, each eager (host reads: row counts) or as compiled / captured
# code runs them (no host read: round 59's traced grouped path; the masked loop over every slot)
PATHS = {"grouped": (True, True), "loop": (False, True), "traced": (True, False), "masked": (False, False)}


def _case_run(case, dtype, grouped, chunk, inter):
    """Runs experts_backward on ``case`` in ``dtype``: (the six gradients, the float64 reference's leaves)."""
    t, k, e, h, _, activation, on_input, emap_kind, workspace, _ = case
    x, w, ids, w13, w2, b13, b2 = _problem(t, k, e, h, inter, activation, dtype)
    emap = None
    if emap_kind == "half":  # global ids 0..7, local experts 0..3 are global 0..3
        emap = torch.tensor([0, 1, 2, 3, -1, -1, -1, -1], dtype=torch.int32)
        w13, w2, b13, b2 = w13[:4], w2[:4], b13[:4], b2[:4]
    if emap_kind == "hot":
        ids = torch.full_like(ids, 2)[:, :1].expand(t, 1).contiguous()
        w, k = w[:, :1], 1
    dy = torch.randn(t, h).to(dtype)
    got = experts_backward(dy, x, w, ids, stacks_of=lambda a, b, dt: (w13[a:b].to(dt), w2[a:b].to(dt)),
                           shapes=(w13.shape[0], w13.shape[1], h, inter), activation=activation, on_input=on_input,
                           w1_bias=b13, w2_bias=b2, expert_map=emap, need=NEED_ALL, expert_chunk=chunk,
                           workspace_bytes=workspace, grouped=grouped)
    leaves = [v.detach().double().requires_grad_() for v in (x, w, w13, w2, b13, b2)]
    if t:
        _ref(*leaves[:2], ids.long(), *leaves[2:], activation, on_input, emap).backward(dy.double())
    return got, leaves


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES)
def test_backward_paths_match_float64(path, case, monkeypatch):
    grouped, host = PATHS[path]
    monkeypatch.setattr("moekit.ops.experts_grad.host_sync_allowed", lambda: host)
    got, leaves = _case_run(case, torch.float32, grouped, case[9], case[4])
    for name, g, leaf in zip(("dx", "dw", "dW13", "dW2", "db13", "db2"), got, leaves):
        assert g is not None and g.shape == leaf.shape, name
        want = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        torch.testing.assert_close(g.double(), want, rtol=1e-4, atol=1e-5, msg=name)
    if case[7] == "hot":
        assert got[2][[0, 1, 3, 4, 5, 6]].abs().max() == 0  # experts no slot reached


def test_bf16_grouped_and_loop_paths_agree():
    # the grouped path runs bf16 GEMMs (float32 accumulation), the loop float32 ones: within bf16's tolerance
    x, w, ids, w13, w2, b13, b2 = _problem(33, 2, 6, 32, 16, "silu", torch.bfloat16)
    dy = torch.randn(33, 32, dtype=torch.bfloat16)
    kw = dict(stacks_of=lambda a, b, dt: (w13[a:b].to(dt), w2[a:b].to(dt)), shapes=(6, 32, 32, 16),
              activation="silu", w1_bias=b13, w2_bias=b2, need=NEED_ALL)
    grouped = experts_backward(dy, x, w, ids, grouped=True, **kw)
    loop = experts_backward(dy, x, w, ids, grouped=False, **kw)
    for name, a, b in zip(("dx", "dw", "dW13", "dW2", "db13", "db2"), grouped, loop):
        rms = ((a.double() - b.double()).pow(2).mean().sqrt() / b.double().pow(2).mean().sqrt()).item()
        assert rms <= 1e-2, f"{name}: {rms:.3g}"


def test_experts_without_rows_add_zero_whatever_the_gemm_leaves(monkeypatch):
    # on CUDA the K-grouped product (weight gradients) does not write an empty group's block: poisoned with NaN here
    # (the CPU kernel writes zeros), a chunk's experts without rows must still add exactly 0
    from moekit.ops import experts_grad_grouped as grouped

    real = grouped._GMM

    def poisoned(a, b, offs):
        out = real(a, b, offs=offs)
        if a.dim() == 2 and b.dim() == 2:
            sizes = torch.diff(offs, prepend=offs.new_zeros(1))
            out[sizes == 0] = float("nan")
        return out

    monkeypatch.setattr(grouped, "_GMM", poisoned)
    x, w, ids, w13, w2, b13, b2 = _problem(6, 2, 6, 16, 12, "silu")
    ids[:, 0], ids[:, 1] = 1, 4  # experts 0, 2, 3, 5: no rows (empty groups between and around the live ones)
    for host in (True, False):  # eager, and without host reads (the traced path gives every expert a group)
        monkeypatch.setattr("moekit.ops.experts_grad.host_sync_allowed", lambda: host)
        got = experts_backward(torch.randn(6, 16), x, w, ids,
                               stacks_of=lambda a, b, dt: (w13[a:b].to(dt), w2[a:b].to(dt)),
                               shapes=(6, 24, 16, 12), activation="silu", need=NEED_ALL, grouped=True)
        assert torch.isfinite(got[2]).all() and torch.isfinite(got[3]).all()
        assert got[2][[0, 2, 3, 5]].abs().max() == 0 and got[2][[1, 4]].abs().min() >= 0


def test_traced_path_reads_nothing_from_the_host(monkeypatch):
    # (round 59) what compiled code and a CUDA-graph capture run: no host read of a device value (.item(), .tolist():
    # aten._local_scalar_dense) and no tensor made from host data (aten.lift_fresh: a blocking copy to the device, not
    # allowed while capturing), here in the padded (several chunks) case with experts held elsewhere
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(str(func))
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr("moekit.ops.experts_grad.host_sync_allowed", lambda: False)
    x, w, ids, w13, w2, b13, b2 = _problem(101, 2, 8, 16, 8, "silu", torch.bfloat16)
    emap = torch.tensor([0, 1, 2, 3, -1, -1, -1, -1], dtype=torch.int32)
    w13, w2, b13, b2 = w13[:4], w2[:4], b13[:4], b2[:4]
    with Ops() as ops:
        got = experts_backward(torch.randn(101, 16, dtype=torch.bfloat16), x, w, ids,
                               stacks_of=lambda a, b, dt: (w13[a:b].to(dt), w2[a:b].to(dt)), shapes=(4, 16, 16, 8),
                               activation="silu", w1_bias=b13, w2_bias=b2, expert_map=emap, need=NEED_ALL,
                               workspace_bytes=2048)
    assert all(g is not None for g in got)
    assert any("_grouped_mm" in op for op in ops.seen)  # (the traced grouped path ran)
    assert not {op for op in ops.seen if "_local_scalar_dense" in op or "lift_fresh" in op}, ops.seen


@pytest.mark.parametrize("host", [True, False], ids=["grouped", "traced"])
@pytest.mark.parametrize("case", CASES)
def test_bf16_grouped_paths_match_float64(host, case, monkeypatch):
    # the grouped paths in bf16, their dtype on a GPU (the float32 cases above take the masked loop without host reads:
    # torch's tracer runs _grouped_mm in bf16 only): eager (expert-aligned groups, a hot expert split and summed in
    # float32) and traced (one chunk: the GEMMs' outputs as they are; several: summed in float32), within bf16's
    # rounding of the float64 reference (relative RMS per gradient)
    monkeypatch.setattr("moekit.ops.experts_grad.host_sync_allowed", lambda: host)
    torch.manual_seed(0)
    # (the traced path takes every expert at once; bf16 rows of 16-byte multiples, as _grouped_mm needs)
    got, leaves = _case_run(case, torch.bfloat16, True, case[9] if host else None, -(-case[4] // 8) * 8)
    for name, g, leaf in zip(("dx", "dw", "dW13", "dW2", "db13", "db2"), got, leaves):
        assert g is not None and g.shape == leaf.shape, name
        want = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        err = (g.double() - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt().clamp_min(1e-12)
        assert err <= 2e-2 or want.abs().sum() == g.double().abs().sum() == 0, f"{name}: relative RMS {err.item():.3g}"


def test_expert_chunks_without_rows_are_not_dequantised(monkeypatch):
    # (quantised layers: stacks_of dequantises, and their weights get no gradient) the eager grouped path asks only
    # for the expert chunks that have rows; with weight gradients wanted (unquantised: views) every chunk is asked
    monkeypatch.setattr("moekit.ops.experts_grad.host_sync_allowed", lambda: True)
    x, w, ids, w13, w2, b13, b2 = _problem(6, 2, 6, 16, 16, "silu", torch.bfloat16)
    ids[:, 0], ids[:, 1] = 1, 4
    for need, want in (((True, True, False, False, False, False), [(1, 2), (4, 5)]),
                       (NEED_ALL, [(e, e + 1) for e in range(6)])):
        asked = []

        def stacks_of(a, b, dt):
            asked.append((a, b))
            return w13[a:b].to(dt), w2[a:b].to(dt)

        experts_backward(torch.randn(6, 16, dtype=torch.bfloat16), x, w, ids, stacks_of=stacks_of,
                         shapes=(6, 32, 16, 16), activation="silu", need=need, expert_chunk=1, grouped=True)
        assert asked == want


def test_eager_grouped_path_reads_and_copies_nothing_once_gemms_are_queued(monkeypatch):
    # (round 60, from a GPU profile of a patched training step) the eager grouped path reads the row counts once; after
    # the first grouped GEMM is queued nothing may read the device (.item / .tolist) or copy host data to it
    # (torch.tensor of a host list: a blocking copy): each drained the stream between the groups' GEMMs. Several
    # groups, a split hot expert and experts without rows here
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr("moekit.ops.experts_grad.host_sync_allowed", lambda: True)
    x, w, ids, w13, w2, b13, b2 = _problem(101, 2, 8, 16, 16, "silu", torch.bfloat16)
    ids[:50, 0] = 3  # a hot expert
    ids[:, 1] = torch.where(ids[:, 1] == 3, 5, ids[:, 1])
    ids[ids == 6] = 7  # an expert without rows
    with Ops() as ops:
        got = experts_backward(torch.randn(101, 16, dtype=torch.bfloat16), x, w, ids,
                               stacks_of=lambda a, b, dt: (w13[a:b].to(dt), w2[a:b].to(dt)), shapes=(8, 32, 16, 16),
                               activation="silu", w1_bias=b13, w2_bias=b2, need=NEED_ALL, workspace_bytes=4096,
                               grouped=True)
    first = next(i for i, op in enumerate(ops.seen) if "_grouped_mm" in op)
    assert sum("_grouped_mm" in op for op in ops.seen) > 5 * 3  # (several groups ran)
    late = [op for op in ops.seen[first:] if "_local_scalar_dense" in op or "lift_fresh" in op or "nonzero" in op
            or "repeat_interleave" in op]
    assert not late, late
    assert got[2][6].abs().max() == 0 and got[2][3].abs().max() > 0
