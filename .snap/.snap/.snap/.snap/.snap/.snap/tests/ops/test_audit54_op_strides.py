"""Round 54: a direct ``torch.ops.moekit.*`` call with views of non-unit last stride (a transposed tensor).

The public launchers make rows contiguous before they call an op, but the ops are public too: their bodies read rows
as ``base + row · stride(0) + col``, so before round 54 a transposed view was read with the wrong strides (silently
wrong values), and two fake kernels copied the input's strides where the launcher returns contiguous tensors (what
``opcheck`` compares). Each test: the op on transposed views equals the op on contiguous copies, bit for bit, and
``opcheck`` passes on the views. CPU, the Triton interpreter.
"""

import pytest
import torch

pytest.importorskip("triton")

from moekit.ops import triton_experts as te, triton_experts_quant as tq, triton_gate as tg  # noqa: E402
from moekit.ops import triton_routing as tr, triton_zero as tz  # noqa: E402
from moekit.ops.formats import Fp8ChannelFormat  # noqa: E402
from moekit.ops.quant_spec import QuantSpec  # noqa: E402
from moekit.ops.quantize import quantize_experts  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU (the Triton interpreter)")


def _t(x: torch.Tensor) -> torch.Tensor:
    """The same values as ``x`` [R, C] in a view of strides (1, R): a transposed tensor's layout."""
    return x.t().contiguous().t()


def _same(op, views, plain):
    a, b = op(*views), op(*plain)
    for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        assert u.is_contiguous() and torch.equal(u, v)
    torch.library.opcheck(op, views)


def test_route_and_gate_ops_on_transposed_views():
    # edge: logits [T, E] and the gate's x [T, H] / weight [N, H] with stride(-1) != 1 (read as rows: wrong ids)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 16, generator=g)
    args = (None, 4, "softmax", True, 1.0, 1, 1, torch.int32)
    _same(tr.route_op, (_t(logits), *args), (logits, *args))
    x, w = torch.randn(5, 48, generator=g), torch.randn(16, 48, generator=g)
    _same(tg.router_gate_op, (_t(x), _t(w), None, torch.float32), (x, w, None, torch.float32))


def test_zero_ops_on_transposed_views():
    # edge: LongCat's zero slots and combine with transposed hidden states, weights, ids and routed rows
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(4, 24, generator=g), torch.rand(4, 3, generator=g)
    ids = torch.tensor([[0, 6, 2], [7, 1, 3], [5, 6, 7], [2, 3, 4]], dtype=torch.int32)
    _same(tz.zero_slots_op, (_t(w), _t(ids), 6), (w, ids, 6))
    r, s = torch.randn(4, 24, generator=g), torch.rand(4, 2, generator=g)
    _same(tz.zero_combine_op, (_t(r), _t(x), s[:, 1], 2.0), (r, x, s[:, 1].contiguous(), 2.0))


def test_fused_experts_ops_on_transposed_views():
    # edge: every row tensor of the experts ops transposed (x, weights, ids, biases), bf16 and fp8 per-channel
    g = torch.Generator().manual_seed(2)
    e, k, h, i, t = 4, 2, 32, 16, 5
    x = torch.randn(t, h, generator=g)
    w13, w2 = torch.randn(e, 2 * i, h, generator=g) * h**-0.5, torch.randn(e, h, i, generator=g) * i**-0.5
    tw = torch.rand(t, k, generator=g) + 0.05
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).int()
    b13, b2 = torch.randn(e, 2 * i, generator=g) * 0.1, torch.randn(e, h, generator=g) * 0.1
    tail = ("silu", False, _t(b13), _t(b2), None, None)
    _same(te.fused_experts_op, (_t(x), w13, w2, _t(tw), _t(ids), *tail),
          (x, w13, w2, tw, ids, "silu", False, b13, b2, None, None))
    fmt = Fp8ChannelFormat()
    q13, q2, s13, s2 = quantize_experts(w13.bfloat16(), w2.bfloat16(), fmt)
    spec = QuantSpec.of(fmt)
    xb = x.bfloat16()
    rest = (None, None, fmt.name, spec.block_n, spec.block_k, spec.ue8m0, spec.per_tensor, "silu", False, None, None,
            None, None, False)
    _same(tq.fused_experts_quant_op, (_t(xb), q13.view(torch.uint8), q2.view(torch.uint8), _t(tw), _t(ids),
                                      _t(s13), _t(s2), *rest),
          (xb, q13.view(torch.uint8), q2.view(torch.uint8), tw, ids, s13, s2, *rest))
