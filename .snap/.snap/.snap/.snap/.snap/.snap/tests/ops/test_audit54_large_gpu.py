"""Offsets past 2^31 elements on a GPU (round 54's int32 audit; the CPU side and the arithmetic:
``test_audit54_large.py``).

Each test runs the real Triton / Gluon path on a problem where some index · stride product passes 2^31 elements
inside one chunk of the launcher, then checks the rows that live there:

- against the torch twin on sampled tokens (the first and last ones: x / out rows; tokens of the last expert: the
  last rows of the sorted layout, inter / part rows), and
- bit for bit against the same call on the token-wise inputs rolled by half the batch (SPEC §9: a token's output
  does not depend on the rest of the batch), which moves other tokens onto the rows past 2^31.

What passes 2^31 where (elements): bf16 x / out rows (tokens · H), inter rows (sorted rows · I), the split w13's
fp32 rows (rows · 2I), the slot rows of the top-k sum (slots · H, fused and separate sum); the router gate's input
rows and the zero-expert kernels' rows (tokens · H); mxfp4 inter rows; fp8 block x_q (tokens · H), inter_q and its
bf16 source (rows · I) and the fp32 slot rows (slots · H). On an sm_90 GPU the untuned configs run the Gluon fp8
w13 / w2 and the Gluon 4-bit w13 there. Peak memory about 45 GB (the fp8 test); run on an H100 / H200.
"""

import pytest
import torch

pytest.importorskip("triton")

from reference import rel_rms

from moekit.ops import triton_experts as te
from moekit.ops import triton_experts_quant as tq
from moekit.ops.experts import fused_experts_torch
from moekit.ops.experts_quant import fused_experts_quant_torch
from moekit.ops.formats import Fp8BlockFormat, Mxfp4Format
from moekit.ops.quantize import quantize_experts
from moekit.ops.triton_gate import router_gate_triton
from moekit.ops.triton_zero import zero_combine_triton, zero_slots_triton
from moekit.ops.zero_experts import zero_combine_torch, zero_slots_torch

pytestmark = pytest.mark.gpu
P31 = 2**31
DT = torch.bfloat16


@pytest.fixture(autouse=True)
def _release():
    yield
    torch.cuda.empty_cache()


class _Chunks(list):
    """The chunk sizes the launcher picked, one per call; :meth:`one` makes it run every later call in one chunk."""

    def __init__(self, monkeypatch):
        super().__init__()
        self._mp, real = monkeypatch, te.chunk_size
        monkeypatch.setattr(te, "chunk_size", lambda *a, **kw: self._seen(real(*a, **kw)))

    def _seen(self, chunk: int) -> int:
        self.append(chunk)
        return chunk

    def one(self) -> None:
        self._mp.setattr(te, "chunk_size", lambda t, *a, **kw: self._seen(t))


@pytest.fixture
def chunks(monkeypatch):
    return _Chunks(monkeypatch)


def _problem(t, e, k, h, i, seed):
    """bf16 x [T, H], w1 [E, 2I, H], w2 [E, H, I], weights [T, K], distinct ids [T, K] int32 (on the GPU)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(t, h, device="cuda", dtype=DT, generator=g)
    w1 = torch.randn(e, 2 * i, h, device="cuda", dtype=DT, generator=g) / h**0.5
    w2 = torch.randn(e, h, i, device="cuda", dtype=DT, generator=g) / i**0.5
    first = torch.randint(0, e, (t, 1), device="cuda", generator=g, dtype=torch.int32)
    ids = (first + torch.arange(k, device="cuda", dtype=torch.int32)) % e
    w = torch.rand(t, k, device="cuda", generator=g) + 0.05
    return x, w1, w2, w, ids


def _rows(ids: torch.Tensor, e: int, n: int = 64) -> torch.Tensor:
    """Tokens to check against the twin: the first and last 32 (x / out / slot rows) and the last ``n`` routed to
    expert E - 1 (the last rows of the sorted layout)."""
    t = ids.shape[0]
    last = (ids == e - 1).any(1).nonzero().flatten()[-n:]
    edge = torch.arange(32, device=ids.device)
    return torch.cat([edge, last, t - 32 + edge]).unique()


def _near(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-2, row_tol: float = 3e-2) -> None:
    """``out`` [N, H] close to the twin's ``ref``: relative RMS over all rows and in every row (a wrapped offset
    gives whole wrong rows)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape and torch.isfinite(out).all()
    per_row = ((out - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-30)).max().item()
    assert rel_rms(out, ref) <= tol and per_row <= row_tol, (rel_rms(out, ref), per_row)


def _same_rolled(run, out: torch.Tensor, *token_args: torch.Tensor) -> None:
    """``run`` on the token-wise inputs rolled by T / 2 gives ``out`` rolled: the same bits in every row."""
    t = out.shape[0]
    s = t // 2
    out2 = run(*[a.roll(s, 0) for a in token_args])
    assert torch.equal(out2[s:], out[: t - s]) and torch.equal(out2[:s], out[t - s:])


def test_bf16_token_rows_past_2_31(chunks):
    """x and out rows past 2^31 elements (T · H = 2.2e9, one chunk): w13's gathered input rows, w2's direct
    output store (K = 1)."""
    t, e, k, h, i = 270_000, 8, 1, 8192, 128
    x, w1, w2, w, ids = _problem(t, e, k, h, i, seed=1)
    run = lambda x, w, ids: te.fused_experts_triton(x, w1, w2, w, ids)  # noqa: E731
    out = run(x, w, ids)
    assert chunks == [t] and t * h >= P31
    rows = _rows(ids, e)
    _near(out[rows], fused_experts_torch(x[rows].float(), w1.float(), w2.float(), w[rows], ids[rows]))
    _same_rolled(run, out, x, w, ids)


def test_bf16_inter_rows_past_2_31(chunks):
    """The intermediate rows past 2^31 elements (sorted rows · I = 2.5e9, one chunk): w13's store, w2's A tiles
    (pointers or tensor descriptor); and the split w13 (config ``"w13_split"``) in one chunk, whose fp32 gate | up
    rows pass 2^31 twice over (rows · 2I = 4.9e9: the epilogue pass): the same bits as the fused w13."""
    t, e, k, h, i = 300_000, 4, 1, 1024, 8192
    x, w1, w2, w, ids = _problem(t, e, k, h, i, seed=2)
    cfg = te.get_config(x.device, t, e, h, i, k, DT, True)
    run = lambda x, w, ids, c=cfg: te.fused_experts_impl(x, w1, w2, w, ids, "silu", False, None, None, None,  # noqa
                                                         None, config=c)
    out = run(x, w, ids)
    assert chunks == [t] and t * i >= P31
    rows = _rows(ids, e)
    _near(out[rows], fused_experts_torch(x[rows].float(), w1.float(), w2.float(), w[rows], ids[rows]))
    _same_rolled(run, out, x, w, ids)
    chunks.one()  # the split rows count against the workspace bound: force them past 2^31 in one chunk
    split = run(x, w, ids, dict(cfg, w13_split=True))
    assert chunks[-1] == t
    assert torch.equal(split, out)


@pytest.mark.parametrize("sum_pass", [True, False], ids=["sum_pass", "fused_sum"])
def test_bf16_slot_rows_past_2_31(chunks, sum_pass):
    """The weighted slot rows of the top-k sum past 2^31 elements (slots · H = 2.9e9, one chunk): w2's stores,
    the sum pass or the fused sum in w2's tail (its semaphores, the completing program's reads)."""
    t, e, k, h, i = 180_000, 8, 2, 8192, 64
    x, w1, w2, w, ids = _problem(t, e, k, h, i, seed=3)
    cfg = dict(te.get_config(x.device, t, e, h, i, k, DT, True), sum_pass=sum_pass)
    run = lambda x, w, ids: te.fused_experts_impl(x, w1, w2, w, ids, "silu", False, None, None, None,  # noqa
                                                  None, config=cfg)
    out = run(x, w, ids)
    assert chunks == [t] and t * k * h >= P31
    rows = _rows(ids, e)
    _near(out[rows], fused_experts_torch(x[rows].float(), w1.float(), w2.float(), w[rows], ids[rows]))
    _same_rolled(run, out, x, w, ids)


def test_router_gate_and_zero_experts_past_2_31():
    """The router gate (8 chunks of H, their fp32 partials summed) and the zero-expert kernels on rows past 2^31
    elements (T · H = 2.2e9): the same bits as the rows alone (the gate is batch invariant; the zero-expert kernels
    match their twins bit for bit)."""
    t, h, n, e, k = 270_000, 8192, 64, 8, 4
    g = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(t, h, device="cuda", dtype=DT, generator=g)
    wg = torch.randn(n, h, device="cuda", dtype=DT, generator=g) / h**0.5
    rows = torch.cat([torch.arange(64), torch.arange(t - 64, t)]).cuda()
    logits = router_gate_triton(x, wg, None, torch.float32)
    assert torch.equal(logits[rows], router_gate_triton(x[rows], wg, None, torch.float32))
    torch.testing.assert_close(logits[rows], x[rows].float() @ wg.float().t(), atol=1e-3, rtol=1e-3)
    del logits
    ids = torch.randint(0, e + 2, (t, k), device="cuda", generator=g, dtype=torch.int32)  # ids >= E: zero experts
    w = torch.rand(t, k, device="cuda", generator=g)
    w_out, ids_out, s = zero_slots_triton(w, ids, e)
    for a, b in zip((w_out, ids_out, s), zero_slots_torch(w[rows], ids[rows], e)):
        assert torch.equal(a[rows], b)
    del w_out, ids_out
    out = zero_combine_triton(x, x, s, 2.5)
    assert torch.equal(out[rows], zero_combine_torch(x[rows], x[rows], s[rows], 2.5))


def _quant_run(fmt, x, w1, w2, w, ids):
    """(run(x, w, ids), the twin on the CPU for rows) of ``fmt``'s experts made from w1 / w2."""
    q13, q2, s13, s2 = quantize_experts(w1, w2, fmt)
    kw = dict(fmt=fmt, w13_scale=s13, w2_scale=s2)

    def twin(rows):
        cpu = dict(kw, w13_scale=s13.cpu(), w2_scale=s2.cpu())
        return fused_experts_quant_torch(x[rows].cpu(), q13.cpu(), q2.cpu(), w[rows].cpu(), ids[rows].cpu(), **cpu)

    return (lambda x, w, ids: tq.fused_experts_quant_triton(x, q13, q2, w, ids, **kw)), twin


def test_mxfp4_inter_rows_past_2_31(chunks):
    """mxfp4 weights (bf16 activations): the intermediate rows past 2^31 elements (sorted rows · I = 2.3e9, one
    chunk of the default bound)."""
    t, e, k, h, i = 140_000, 4, 2, 1024, 8192
    x, w1, w2, w, ids = _problem(t, e, k, h, i, seed=5)
    run, twin = _quant_run(Mxfp4Format(), x, w1, w2, w, ids)
    out = run(x, w, ids)
    assert chunks == [t] and t * k * i >= P31
    rows = _rows(ids, e)
    _near(out[rows], twin(rows))
    _same_rolled(run, out, x, w, ids)


def test_fp8_block_past_2_31(chunks):
    """fp8 block weights and activations in one chunk (forced: the default bound keeps fp8 rows, bytes, under
    2^31): x_q rows (tokens · H = 2.2e9), w2's input and its bf16 source rows (sorted rows · I = 2.2e9), the fp32 slot
    rows (slots · H = 4.4e9); vs the CPU twin (SPEC §8's bound)."""
    t, e, k, h, i = 540_000, 4, 2, 4096, 2048
    x, w1, w2, w, ids = _problem(t, e, k, h, i, seed=6)
    run, twin = _quant_run(Fp8BlockFormat(128, 128), x, w1, w2, w, ids)
    del w1, w2
    chunks.one()
    out = run(x, w, ids)
    assert chunks == [t] and t * h >= P31 and t * k * i >= P31
    rows = _rows(ids, e)
    _near(out[rows], twin(rows))
    _same_rolled(run, out, x, w, ids)
