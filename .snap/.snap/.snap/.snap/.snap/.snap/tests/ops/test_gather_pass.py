"""``"gather_pass"`` (config key): the live slots' input rows copied into the sorted layout by
:func:`moekit.ops._triton.rows.gather_rows_kernel`, and the Triton w13 reading its activation tiles from there by
tensor descriptor (tail blocks by pointers) instead of gathering them by token. The same values reach the same dots,
so the output must be the same bits as without the pass; and both within the bf16 tolerance of the float64 twin.

On CPU under the Triton interpreter (``TRITON_INTERPRET=1``, set by conftest) on small shapes; natively on a GPU.
"""

import pytest
import torch
from reference import ref_experts
from small_experts import DEV, experts_problem

pytest.importorskip("triton")

from moekit.ops import triton_experts as te  # noqa: E402
from moekit.ops.config_keys import check_config  # noqa: E402
from moekit.ops.triton_plan import _freeze, launch_plan  # noqa: E402


def _make(t, e, k, h, i, dtype, act, bias, hot, seed):
    """:func:`small_experts.experts_problem` on the device; ``hot``: every token's first slot on expert 0 (several full
    blocks and a tail for one expert)."""
    w1, w2, x, w, ids, b1, b2 = experts_problem(dtype, act, bias, seed=seed, t=t, e=e, h=h, i=i, k=k)
    if hot:
        rows = ids.tolist()
        for row in rows:  # expert 0 into slot 0 (a row holds it at most once)
            if 0 in row:
                j = row.index(0)
                row[0], row[j] = row[j], row[0]
            else:
                row[0] = 0
        ids = torch.tensor(rows, dtype=ids.dtype, device=ids.device)
    return x, w1.to(DEV), w2.to(DEV), w, ids, b1, b2


def _cfg(bm=16, bk=32, tail=0, gather=True, split=False):
    cfg = {"BLOCK_M": bm, "tma": True, "gather_pass": gather, "w13_split": split,
           "w13": dict(BN=32, BK=bk, GROUP_M=2, num_warps=4, num_stages=2),
           "w2": dict(BN=32, BK=32, GROUP_M=2, num_warps=4, num_stages=2)}
    return dict(cfg, tail_bm=tail) if tail else cfg


CASES = [
    # (T, E, K, H, I, act, bias, on_input, hot, tail, bk, split, dtype): the edge each covers
    (37, 5, 2, 64, 32, "silu", False, False, False, 0, 32, False, torch.bfloat16),  # plain, several blocks per expert
    (23, 4, 3, 72, 40, "swigluoai", True, False, False, 0, 32, False, torch.bfloat16),  # H % BK != 0 (TMA's zero fill)
    (41, 6, 2, 64, 32, "silu", False, False, True, 16, 32, False, torch.bfloat16),  # hot expert + BS-row tail blocks
    (29, 5, 1, 48, 24, "silu", False, True, False, 0, 16, False, torch.bfloat16),  # weight on the input (K = 1)
    (31, 4, 2, 64, 32, "relu2", False, False, False, 0, 32, False, torch.float16),  # non-gated, fp16
    (19, 4, 2, 64, 32, "gelu", True, False, False, 0, 32, True, torch.bfloat16),  # w13_split (one accumulator)
    (1, 4, 2, 64, 32, "silu", False, False, False, 0, 32, False, torch.bfloat16),  # T = 1 past the inline bound
]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's dots over the unwritten padding rows
@pytest.mark.parametrize("t,e,k,h,i,act,bias,on_input,hot,tail,bk,split,dtype", CASES)
def test_gather_pass_keeps_the_bits(t, e, k, h, i, act, bias, on_input, hot, tail, bk, split, dtype, monkeypatch):
    # a T = 1 call runs the align kernel too (else the GEMMs derive the layout inline and no pass runs)
    monkeypatch.setattr(te, "INLINE_SLOTS", 0)
    x, w1, w2, w, ids, b1, b2 = _make(t, e, k, h, i, dtype, act, bias, hot, 4321 + t)
    run = lambda cfg: te.fused_experts_impl(x, w1, w2, w, ids, act, on_input, b1, b2, None, None,  # noqa: E731
                                            config=cfg)
    cfg = _cfg(bm=32 if tail else 16, tail=tail, bk=bk, split=split)
    plan = launch_plan(t, h, i, w1.shape[1], e, e, k, dtype, 0, act != "relu2", on_input, bias, bias, False, None,
                       True, te.SMALL_SLOTS, 0, _freeze(cfg))
    assert plan.gather  # the pass runs in this case (it is not silently skipped)
    out = run(cfg)
    assert torch.equal(out, run(dict(cfg, gather_pass=False)))
    cpu = lambda v: v.double().cpu() if v is not None else None  # noqa: E731 - the oracle runs on the CPU
    ref = ref_experts(cpu(x), cpu(w1), cpu(w2), w.cpu(), ids.cpu(), activation=act, b13=cpu(b1), b2=cpu(b2),
                      apply_router_weight_on_input=on_input)
    rel = ((cpu(out) - ref).norm() / ref.norm()).item()
    assert rel <= 1e-2, rel


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's dots over the unwritten padding rows
def test_gather_pass_keeps_the_bits_with_an_expert_map():
    # expert parallelism: this rank holds 4 of 8 experts (-1: elsewhere), so the align layout has dead slots that
    # the pass must skip; the output still equals the pointer gather's bit for bit, and the oracle's with the map
    emap = torch.tensor([0, -1, 1, -1, 2, 3, -1, -1], dtype=torch.int32, device=DEV)
    x, w1, w2, w, ids, _, _ = _make(33, 8, 3, 64, 32, torch.bfloat16, "silu", False, False, 77)
    w1, w2 = w1[[0, 2, 4, 5]].contiguous(), w2[[0, 2, 4, 5]].contiguous()
    run = lambda cfg: te.fused_experts_impl(x, w1, w2, w, ids, "silu", False, None, None, emap, None,  # noqa: E731
                                            config=cfg)
    out = run(_cfg())
    assert torch.equal(out, run(_cfg(gather=False)))
    ref = ref_experts(x.double().cpu(), w1.double().cpu(), w2.double().cpu(), w.cpu(), ids.cpu(),
                      expert_map=emap.cpu())
    assert ((out.double().cpu() - ref).norm() / ref.norm()).item() <= 1e-2


def test_gather_rows_kernel_writes_live_rows_only():
    """Every live slot's row lands at row_start[loc] + rank; rows no slot maps to keep what they held."""
    from moekit.ops._triton.rows import gather_rows_kernel

    t, k, h = 5, 2, 40
    x = torch.randn(t, h, device=DEV)
    loc = torch.tensor([1, 0, -1, 1, 0, 0, 1, -1, 0, 1], dtype=torch.int32, device=DEV)
    rank = torch.tensor([0, 0, 0, 1, 1, 2, 2, 0, 3, 3], dtype=torch.int32, device=DEV)
    row_start = torch.tensor([0, 8], dtype=torch.int32, device=DEV)
    xg = torch.full((16, h), 7.0, device=DEV)
    gather_rows_kernel[(3, 2)](x, xg, loc, rank, row_start, t * k, k, h, x.stride(0), xg.stride(0), BS=4, BH=32)
    want = torch.full((16, h), 7.0, device=DEV)
    for s in range(t * k):
        if loc[s] >= 0:
            want[row_start[loc[s]] + rank[s]] = x[s // k]
    assert torch.equal(xg, want)


def test_gather_pass_is_skipped_where_it_cannot_apply():
    """No pass without an align kernel (inline decode), without "tma", or with swapped w13 tiles; and the key must
    be a flag."""
    cfg = _cfg()
    args = (64, 32, 64, 4, 4, 2, torch.bfloat16, 0, True, False, False, False, False, None, True, 64)
    on, off = launch_plan(8, *args, 0, _freeze(cfg)), launch_plan(8, *args, 0, _freeze(dict(cfg, gather_pass=False)))
    assert on.gather and not off.gather
    # the gathered rows share the dtype scratch, past the part rows (one allocation; 128-byte aligned for TMA)
    assert on.buf_total == on.xg_offset + on.rows * 64 and off.buf_total == off.part_offset + off.part_rows * 64
    assert on.xg_offset >= on.part_offset + on.part_rows * 64 and on.xg_offset % 64 == 0
    assert not launch_plan(8, *args, 16, _freeze(cfg)).gather  # inline layout: 16 slots <= 16
    assert not launch_plan(8, *args, 0, _freeze(dict(cfg, tma=False))).gather
    assert not launch_plan(8, *args, 0, _freeze(dict(cfg, w13=dict(cfg["w13"], SWAP=1)))).gather
    with pytest.raises(ValueError, match='"gather_pass" = 2, expected true or false'):
        check_config(dict(cfg, gather_pass=2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("model", ["deepseek-v3", "gpt-oss-120b", "qwen3-30b-a3b", "mixtral-8x7b"])
def test_gather_pass_keeps_the_bits_of_every_shipped_bf16_bucket(model):
    """The benchmark shapes' H, I and activation (eight experts, so the weights stay small), every bucket of the
    device's bf16 table with the pass against the same config without it: bit-identical outputs."""
    from moekit.benchmarking.shapes import MODELS
    from moekit.ops import triton_configs as tc

    m = MODELS[model]
    key = tc.shape_key(m.E, m.H, m.I, m.K, torch.bfloat16, True)
    _, table = tc.shape_table(torch.cuda.get_device_name(0), key)
    if not table:
        pytest.skip(f"no bf16 table for {model} on this GPU")
    e, k = 8, min(m.K, 8)
    x, w1, w2, w, ids, b1, b2 = _make(300, e, k, m.H, m.I, torch.bfloat16, m.act, m.has_bias, True, 99)
    assert (ids[:, 0] == 0).all() and (ids[:, 1:] != 0).all()  # the hot expert: 300 rows, several blocks and a tail
    limit = 7.0 if m.act == "swigluoai" else None
    ran = 0
    for bucket, cfg in sorted(table.items(), key=lambda kv: int(kv[0])):
        if cfg["w13"].get("SWAP") or not cfg.get("tma"):
            continue  # decode buckets: the pass never runs there (tested above)
        run = lambda c: te.fused_experts_impl(x, w1, w2, w, ids, m.act, False, b1, b2, None, limit,  # noqa: E731
                                              config=c)
        assert torch.equal(run(dict(cfg, gather_pass=True)), run(dict(cfg, gather_pass=False))), bucket
        ran += 1
    assert ran > 0
