"""Round 56 (a user trial): ``torch.compile(fullgraph=True)`` with inductor of a loaded fp8 layer on the torch backend.

- partial blocks (H or I not a multiple of the block) gave NaN or garbage: torch 2.13's CPU inductor miscompiled the
  scale expansion (``ops._quant_rules._expand``) in every form tried (``repeat_interleave`` + a slice, an index
  gather on one row at T = 1, an expanded view flattened and sliced): it is an opaque op while compiling;
- in bf16 the compiled layer skipped the rounding of w2's input to params_dtype before its fp8 quantisation (inductor
  drops a bf16 round trip inside a fused kernel): 5.8e-3 to 1.3e-2 relative RMS from eager, past SPEC §8's 5e-3; the
  rounding goes through an opaque op while compiling (``ops._eager.rounded``).

The suite's other compile tests use ``aot_eager`` (no inductor), which hid both.
"""

import pytest
import torch

import moekit
from moekit.ops._eager import _rounded_op, rounded, tiles_expanded
from moekit.ops._quant_rules import _expand

FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [32, 32]}


@pytest.mark.parametrize("rows, cols, n, k", [(1, 32, 12, 40), (32, 32, 48, 80), (128, 128, 1, 1), (1, 1, 3, 5),
                                              (32, 16, 33, 17)])
def test_expand_is_the_tile_lookup(rows, cols, n, k):
    # edges: one row per tile (activations), partial last tiles in both dims, a single element, no expansion
    g = torch.Generator().manual_seed(rows + n)
    s = torch.rand(2, -(-n // rows), -(-k // cols), generator=g)
    out = _expand(s, rows, cols, n, k)
    naive = torch.tensor([[[float(s[b, i // rows, j // cols]) for j in range(k)] for i in range(n)] for b in range(2)])
    assert out.shape == (2, n, k) and torch.equal(out, naive)
    assert torch.equal(tiles_expanded(s, rows, cols, n, k), naive)
    torch.library.opcheck(tiles_expanded, (s, rows, cols, n, k))


def test_rounded_is_to_and_an_opaque_op():
    # the eager path is x.to(dtype) (the same tensor when the dtype is already right); the op passes opcheck
    x = torch.randn(5, 7) * 3
    assert torch.equal(rounded(x, torch.bfloat16), x.to(torch.bfloat16)) and rounded(x, torch.float32) is x
    torch.library.opcheck(_rounded_op, (x, torch.bfloat16))
    torch.library.opcheck(_rounded_op, (x.half(), torch.float32))


@pytest.mark.parametrize("h, inter", [(48, 40)])  # partial blocks in H (48 = 32 + 16) and in I (40 = 32 + 8)
def test_inductor_compiled_fp8_layer_equals_eager(h, inter):
    # a bf16 fp8-block layer with partial blocks: the inductor-compiled forward gives eager's bits at T = 8 and at
    # T = 1 (dynamo compiles T = 1 as a graph of its own: the decode step; NaN / garbage before the fix); costs one
    # cold inductor build (~50 s on 2 cores)
    layer = moekit.FusedMoE(4, 2, h, inter, params_dtype=torch.bfloat16, quant_config=FP8, backend="torch").eval()
    g = torch.Generator().manual_seed(0)
    layer.load_expert_weights(torch.randn(4, 2 * inter, h, generator=g) * 0.2, torch.randn(4, h, inter, generator=g))
    compiled = torch.compile(layer, fullgraph=True)
    torch._dynamo.reset()
    for t in (8, 1):
        x, logits = torch.randn(t, h, generator=g).bfloat16(), torch.randn(t, 4, generator=g)
        with torch.no_grad():
            eager, got = layer(x, logits), compiled(x, logits)
        assert eager.isfinite().all() and torch.equal(got, eager), t
    torch._dynamo.reset()
