"""Round 54's audit of the torch.compile / custom-op / CUDA-graph contract, on the CPU (Triton kernels interpreted).

- every ``moekit::*`` custom op under ``torch.library.opcheck`` (schema, fake kernel's shapes / dtypes / strides
  against the real op, aliasing, AOT dispatch with static and dynamic shapes) for the combinations the op tests left
  out: dtypes, fp8 block (ue8m0) / channel / tensor / static, mxfp4, int4 groups of 32 and 128, biases, activations
  (clamped swiglu, relu2, gelu), the router weight on the input, T = 0 / 1, K = 1 / E, expert maps with -1 slots;
- ``torch.compile(layer, fullgraph=True)`` of the router kinds, shared experts with a sigmoid gate and the empty batch
  on both backends, and of quantised layers on the Triton backend (the suite compiled only the torch backend's
  layers and a plain Triton one on the CPU), with the number of graphs a run of token counts makes;
- the defects it found, each test failing before its fix: the bounded-memory chunk loops guarded on T itself under
  torch.compile (the experts, the quantised experts and the expert output norm: a graph per T above the bound, and
  a fullgraph compile failed at the 9th), and the torch backend's expert loops read counts on the host (``tolist``,
  ``unique``, ``nonzero``, ``float``) while a CUDA graph was being captured.

Compiles use the ``aot_eager`` backend (no C++ build); small shapes keep the file's CPU time low.
"""

import pytest
import torch
from torch._dynamo.backends.debugging import aot_eager
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

import moekit  # noqa: E402
from moekit.experts import output_norm  # noqa: E402
from moekit.ops import experts as ops_experts, experts_quant as ops_experts_quant  # noqa: E402
from moekit.ops import triton_experts as te, triton_experts_quant as tq, triton_gate as tg  # noqa: E402
from moekit.ops import triton_routing as tr, triton_zero as tz  # noqa: E402
from moekit.ops.formats import Fp8BlockFormat, Fp8ChannelFormat, Int4GroupFormat, Mxfp4Format  # noqa: E402
from moekit.ops.quant_spec import QuantSpec  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU audit (the Triton interpreter)")

E, K, H, I = 8, 2, 32, 16


def _experts(t, e, k, h, i, *, act="silu", num_global=None, seed=0):
    """(x fp32 [T, H], w13, w2 fp32, weights [T, K], ids int32 [T, K] of distinct experts of ``num_global``)."""
    g = torch.Generator().manual_seed(seed)
    rows = i if act == "relu2" else 2 * i
    w13, w2 = torch.randn(e, rows, h, generator=g) * h**-0.5, torch.randn(e, h, i, generator=g) * i**-0.5
    ng = num_global or e
    ids = torch.stack([torch.randperm(ng, generator=g)[:k] for _ in range(t)]) if t else torch.zeros(0, k)
    return torch.randn(t, h, generator=g), w13, w2, torch.rand(t, k, generator=g) + 0.05, ids.int()


def _biases(e, rows, h, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(e, rows, generator=g) * 0.1).to(dtype), (torch.randn(e, h, generator=g) * 0.1).to(dtype)


# ------------------------------------------------------------------ opcheck: moekit::fused_experts
@pytest.mark.parametrize("case", ["fp16_t1_k1_on_input_gelu_int64_ids", "bf16_k_eq_e_swiglu_clamp_bias_map",
                                  "fp32_t0_relu2"])
def test_opcheck_fused_experts(case):
    # the op tests opcheck fp32 silu with biases only: here fp16 with K = 1 and the weight on the input (gelu, int64
    # ids, T = 1), bf16 with K = E, the clamped swiglu, biases and an expert map with -1 slots, and the empty batch
    if case.startswith("fp16"):
        x, w13, w2, w, ids = _experts(1, 4, 1, 32, 16)
        args = (x.half(), w13.half(), w2.half(), w, ids.long(), "gelu", True, None, None, None, None)
    elif case.startswith("bf16"):
        x, w13, w2, w, ids = _experts(3, 2, 4, 32, 16, num_global=4)  # 2 local experts of 4, K = E = 4
        b13, b2 = _biases(2, 32, 32, torch.bfloat16)
        emap = torch.tensor([-1, 0, -1, 1], dtype=torch.int32)
        args = (x.bfloat16(), w13.bfloat16(), w2.bfloat16(), w, ids, "swigluoai", False, b13, b2, emap, 7.0)
    else:
        x, w13, w2, w, ids = _experts(0, 4, 2, 32, 16, act="relu2")
        args = (x, w13, w2, w, ids, "relu2", False, None, None, None, None)
    torch.library.opcheck(te.fused_experts_op, args)


# ------------------------------------------------------------------ opcheck: moekit::fused_experts_quant
QUANT_CASES = {  # format, (T, E_local, K, H, I), activation dtype, activation, extras
    "fp8_block_ue8m0_k_eq_e": (Fp8BlockFormat(64, 32, ue8m0=True), (3, 2, 2, 64, 32), torch.bfloat16, "silu", {}),
    "fp8_channel_relu2_map": (Fp8ChannelFormat(), (3, 2, 2, 64, 32), torch.bfloat16, "relu2", {"map": True}),
    "fp8_tensor_swiglu_clamp": (Fp8ChannelFormat(per_tensor=True), (3, 2, 2, 64, 32), torch.bfloat16, "swigluoai",
                                {"limit": 7.0}),
    "fp8_tensor_static_bias": (Fp8ChannelFormat(per_tensor=True, static_input=True), (3, 4, 2, 64, 32),
                               torch.bfloat16, "silu", {"bias": True}),
    "mxfp4_fp32_bias": (Mxfp4Format(), (2, 4, 2, 64, 32), torch.float32, "silu", {"bias": True}),
    "int4_g32_fp16_t1_k1_on_input": (Int4GroupFormat(32), (1, 4, 1, 64, 32), torch.float16, "silu",
                                     {"on_input": True}),
    "int4_g128": (Int4GroupFormat(128), (2, 2, 1, 128, 128), torch.bfloat16, "silu", {}),
    "fp8_block_t0": (Fp8BlockFormat(32, 32), (0, 4, 2, 64, 32), torch.bfloat16, "silu", {}),
}


@pytest.mark.parametrize("case", list(QUANT_CASES))
def test_opcheck_fused_experts_quant(case):
    # the op tests opcheck fp8 block (32, 32) in bf16 only: every other format, ue8m0 scales, fp16 / fp32
    # activations, both clamped swiglu and relu2, biases, the weight on the input, K = 1 / E, T = 0 / 1, an expert map
    fmt, (t, e, k, h, i), dtype, act, extra = QUANT_CASES[case]
    num_global = 2 * e if extra.get("map") else e
    x, w13, w2, w, ids = _experts(t, e, k, h, i, act=act, num_global=num_global)
    q13, q2, s13, s2 = moekit.quantize_experts(w13.to(dtype), w2.to(dtype), fmt)
    spec = QuantSpec.of(fmt)
    if spec.fp8:  # fp8 weights cross the op boundary as bytes (launch_quant_experts)
        q13, q2 = q13.view(torch.uint8), q2.view(torch.uint8)
    g = torch.Generator().manual_seed(3)
    in13, in2 = (torch.rand(e, generator=g) * 0.01 + 0.004, torch.rand(e, generator=g) * 0.004 + 0.001) \
        if fmt.name == "fp8_channel" and fmt.static_input else (None, None)
    b13, b2 = _biases(e, i if act == "relu2" else 2 * i, h, dtype) if extra.get("bias") else (None, None)
    emap = torch.tensor([-1, 0, -1, 1], dtype=torch.int32) if extra.get("map") else None
    args = (x.to(dtype), q13, q2, w, ids, s13, s2, in13, in2, fmt.name, spec.block_n, spec.block_k, spec.ue8m0,
            spec.per_tensor, act, bool(extra.get("on_input")), b13, b2, emap, extra.get("limit"), False)
    torch.library.opcheck(tq.fused_experts_quant_op, args)


# ------------------------------------------------------------------ opcheck: route, router_gate, zero ops
def test_opcheck_route_gate_and_zero_ops():
    # route: grouped sigmoid with a bias and int64 ids, T = 0, K = E in bf16 (sqrtsoftplus), K = 1 in fp16 (the op test
    # covers softmax fp32 only); router_gate: T = 0, H in two chunks (> 1024 columns) with a bias in fp16; zero ops:
    # T = 0, fp16 rows with int64 ids that hit the zero slots
    lg = torch.randn(3, 16, generator=torch.Generator().manual_seed(5))
    for args in [(lg, torch.rand(16), 4, "sigmoid", True, 2.5, 4, 2, torch.int64),
                 (lg[:0], None, 2, "softmax", False, 1.0, 1, 1, torch.int32),
                 (lg[:1].bfloat16(), None, 16, "sqrtsoftplus", True, 1.0, 1, 1, torch.int32),
                 (lg.half(), None, 1, "softmax", False, 1.0, 1, 1, torch.int32)]:
        torch.library.opcheck(tr.route_op, args)
    torch.library.opcheck(tg.router_gate_op, (torch.randn(0, 40), torch.randn(6, 40), None, torch.float32))
    torch.library.opcheck(tg.router_gate_op, (torch.randn(2, 1100).half(), torch.randn(6, 1100).half(),
                                              torch.randn(6).half(), torch.float16))
    torch.library.opcheck(tz.zero_slots_op, (torch.rand(0, 3), torch.zeros(0, 3).int(), 6))
    ids = torch.tensor([[0, 6, 7], [7, 1, 2]], dtype=torch.int64)
    torch.library.opcheck(tz.zero_slots_op, (torch.rand(2, 3), ids, 6))
    torch.library.opcheck(tz.zero_combine_op, (torch.randn(0, 40), None, None, 2.0))
    torch.library.opcheck(tz.zero_combine_op, (torch.randn(2, 40).half(), torch.randn(2, 40).half(), torch.rand(2),
                                               2.0))


# ------------------------------------------------------------------ torch.compile(fullgraph=True) of layers
def _compile(fn):
    """``torch.compile(fn, fullgraph=True)`` on ``aot_eager``, and the list of graphs it compiles."""
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return aot_eager(gm, inputs)

    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=backend), graphs


def _sigmoid_topk(hidden_states, logits, top_k, renormalize):  # Llama 4's routing function
    values, ids = logits.topk(top_k)
    return torch.sigmoid(values), ids


def _layer(kind, backend, e=E, **extra):
    """(a loaded layer of a router kind in eval mode, its logit columns)."""
    g = torch.Generator().manual_seed(4)
    kw, k, n = {}, K, e
    if kind == "grouped":
        kw = dict(use_grouped_topk=True, num_expert_group=2, topk_group=1, scoring_func="sigmoid",
                  e_score_correction_bias=torch.randn(e, generator=g) * 0.1, routed_scaling_factor=2.5)
    elif kind == "zero_shared_gate":  # LongCat's zero experts, shared experts scaled by sigmoid(gate(h)) per token
        kw = dict(zero_expert_type="identity", e_score_correction_bias=torch.randn(e + 2, generator=g) * 0.1,
                  routed_scaling_factor=2.0, renormalize=False, shared_experts=torch.nn.Linear(H, H),
                  shared_expert_gate=torch.nn.Linear(H, 1, bias=False))
        n = e + 2
    elif kind == "custom_on_input":
        kw, k = dict(custom_routing_function=_sigmoid_topk, apply_router_weight_on_input=True), 1
    elif kind == "hash":
        kw = dict(hash_indices_table=torch.stack([torch.randperm(e, generator=g)[:K] for _ in range(32)]),
                  scoring_func="sqrtsoftplus")
    torch.manual_seed(0)  # the user modules' weights
    layer = moekit.FusedMoE(e, k, H, I, params_dtype=torch.float32, backend=backend, device="cpu", **kw, **extra)
    w13, w2 = torch.randn(e, 2 * I, H, generator=g) * H**-0.5, torch.randn(e, H, I, generator=g) * I**-0.5
    layer.load_expert_weights(w13, w2)
    return layer.eval(), n


@pytest.mark.parametrize("backend,kind", [("triton", "grouped"), ("triton", "zero_shared_gate"),
                                          ("triton", "custom_on_input"), ("triton", "hash"),
                                          ("torch", "zero_shared_gate"), ("torch", "custom_on_input"),
                                          ("torch", "hash")])
def test_compile_fullgraph_router_kinds_and_the_empty_batch(backend, kind):
    # each router kind, the shared experts' sigmoid gate and the empty batch compile without a graph break and give
    # the eager output; a run of token counts makes three graphs: T = 5 (static), any other T > 1 (dynamic), T = 0
    layer, n = _layer(kind, backend, e=4)
    compiled, graphs = _compile(layer)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for t in (5, 7, 3, 0):
            x, lg = torch.randn(t, H, generator=g), torch.randn(t, n, generator=g)
            kw = dict(input_ids=torch.randint(0, 32, (t,), generator=g)) if kind == "hash" else {}
            out = compiled(x, lg, **kw)
            assert out.shape == (t, H)
            torch.testing.assert_close(out, layer(x, lg, **kw), atol=1e-5, rtol=1e-5)
    assert len(graphs) == 3, len(graphs)
    torch._dynamo.reset()


QUANT_LAYERS = {"fp8_tensor_static": Fp8ChannelFormat(per_tensor=True, static_input=True), "mxfp4": Mxfp4Format()}


@pytest.mark.parametrize("name", list(QUANT_LAYERS))
def test_compile_fullgraph_of_a_quantised_layer_on_the_triton_backend(name):
    # the Triton backend's quantised layer (the op with fp8 weights as bytes, static input scales; 4-bit words) traces
    # whole and gives the eager bits (the same kernels); on the CPU only the torch backend's were compiled before
    fmt, e, h, inter = QUANT_LAYERS[name], 4, 64, 64
    g = torch.Generator().manual_seed(7)
    layer = moekit.FusedMoE(e, K, h, inter, params_dtype=torch.bfloat16, quant_config=fmt, backend="triton",
                            device="cpu", has_bias=True)
    q13, q2, s13, s2 = moekit.quantize_experts((torch.randn(e, 2 * inter, h, generator=g) * h**-0.5).bfloat16(),
                                               (torch.randn(e, h, inter, generator=g) * inter**-0.5).bfloat16(), fmt)
    inp = dict(w13_input_scale=torch.rand(e, generator=g) * 0.01 + 0.004,
               w2_input_scale=torch.rand(e, generator=g) * 0.004 + 0.001) if "static" in name else {}
    layer.load_expert_weights(q13, q2, *_biases(e, 2 * inter, h, torch.bfloat16), w13_scale=s13, w2_scale=s2, **inp)
    layer.eval()
    compiled, graphs = _compile(layer)
    with torch.no_grad():
        for t in (3, 1):
            x, lg = torch.randn(t, h, generator=g).bfloat16(), torch.randn(t, e, generator=g)
            assert torch.equal(compiled(x, lg), layer(x, lg)), t
    torch._dynamo.reset()


# ------------------------------------------------------------------ defect: chunk loops guarded on T under compile
def _run_token_counts(layer, ts, width, dtype=torch.float32, tol=1e-5):
    """The number of graphs a compiled ``layer`` makes over the token counts ``ts`` (each equal to eager)."""
    compiled, graphs = _compile(layer)
    g = torch.Generator().manual_seed(8)
    e = layer.moe_config.num_experts
    with torch.no_grad():
        for t in ts:
            x, lg = torch.randn(t, width, generator=g).to(dtype), torch.randn(t, e, generator=g)
            torch.testing.assert_close(compiled(x, lg), layer(x, lg), atol=tol, rtol=tol)
    torch._dynamo.reset()
    return len(graphs)


def test_compiled_reference_experts_above_the_workspace_bound_guard_on_powers_of_two(monkeypatch):
    # the torch backend's compiled expert loop above its workspace bound (256 MiB: ~500 tokens of a Mixtral-sized
    # layer): chunks of chunk_tokens(T, most) in range(0, T, chunk) guarded on T itself, a graph per T and
    # FailOnRecompileLimitHit at the 9th. Now n chunks of ceil(T / n) tokens, n a power of two: T = 20, 25, 30 (bound
    # 16 tokens here, 2 chunks each) share the dynamic graph
    monkeypatch.setitem(ops_experts.experts_reference.__wrapped__.__kwdefaults__, "workspace_bytes", 20000)  # (r68: the
    # autocast_off wrapper holds the function)
    layer, _ = _layer("plain", "torch", e=4)
    assert _run_token_counts(layer, (20, 25, 30), H) == 2


def test_compiled_quantised_reference_experts_above_the_workspace_bound_guard_on_powers_of_two(monkeypatch):
    # the same loop of the quantised twin (fused_experts_quant_torch): T = 5, 6, 7 over a bound of 4 tokens
    monkeypatch.setitem(ops_experts_quant.fused_experts_quant_torch.__wrapped__.__kwdefaults__, "workspace_bytes",
                        20000)
    fmt, g = Int4GroupFormat(32), torch.Generator().manual_seed(9)
    layer = moekit.FusedMoE(4, K, 64, 64, params_dtype=torch.bfloat16, quant_config=fmt, backend="torch")
    q13, q2, s13, s2 = moekit.quantize_experts((torch.randn(4, 128, 64, generator=g) * 0.1).bfloat16(),
                                               (torch.randn(4, 64, 64, generator=g) * 0.1).bfloat16(), fmt)
    layer.load_expert_weights(q13, q2, w13_scale=s13, w2_scale=s2)
    assert _run_token_counts(layer.eval(), (5, 6, 7), 64, torch.bfloat16, tol=1e-2) == 2


def test_compiled_expert_output_norm_guards_on_the_chunk_bound_not_on_t(monkeypatch):
    # normed_experts' loop range(0, T, chunk) guarded on T on every backend, below its bound too (1 GiB of slot rows:
    # every T): a graph per T. Now T <= chunk is one guard and powers of two of the chunk count above it: T = 5, 6, 7
    # (chunk 4 here: 2 chunks), then 2, 3 (one chunk)
    monkeypatch.setattr(output_norm, "NORM_WORKSPACE_BYTES", 2 * H * 20 * 4)  # K·H·(2·4 + 12) B a token: 4 tokens
    from moekit.loading.blocks import RMSNorm

    norm = RMSNorm(H)
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5, generator=torch.Generator().manual_seed(10))
    layer, _ = _layer("plain", "torch", e=4, expert_output_norm=norm)
    assert _run_token_counts(layer, (5, 6, 7, 2, 3), H) == 3


# ------------------------------------------------------------------ defect: host reads inside a CUDA graph capture
class _NoHostReads(TorchDispatchMode):
    """Raises on the ops that read device values on the host (what a CUDA graph capture refuses)."""

    REFUSED = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
               torch.ops.aten._unique2.default, torch.ops.aten.unique_dim.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.REFUSED:
            raise RuntimeError(f"host read while capturing: {func}")
        return func(*args, **(kwargs or {}))


def _refuse_tolist(self):
    raise RuntimeError("host read while capturing: Tensor.tolist")


@pytest.mark.parametrize("quant", [None, "fp8_tensor_static"])
def test_torch_backend_reads_nothing_on_the_host_while_a_cuda_graph_is_captured(monkeypatch, quant):
    # the torch backend skips its value checks while a CUDA graph is captured (host_sync_allowed), but its expert loops
    # still read counts on the host: bincount(...).tolist() (unquantised), float() of the static input scales and
    # unique(...).tolist() / nonzero (quantised), which a capture refuses. Now they take the dense formulation, as under
    # torch.compile. The capture is simulated (no GPU here): a capturing stream for moekit, host reads refused
    g = torch.Generator().manual_seed(11)
    if quant is None:
        layer, _ = _layer("plain", "torch")
        x, tol = torch.randn(6, H, generator=g), 1e-5
    else:
        fmt = QUANT_LAYERS[quant]
        layer = moekit.FusedMoE(E, K, 64, 64, params_dtype=torch.bfloat16, quant_config=fmt, backend="torch").eval()
        q13, q2, s13, s2 = moekit.quantize_experts((torch.randn(E, 128, 64, generator=g) * 0.1).bfloat16(),
                                                   (torch.randn(E, 64, 64, generator=g) * 0.1).bfloat16(), fmt)
        layer.load_expert_weights(q13, q2, w13_scale=s13, w2_scale=s2, w13_input_scale=torch.rand(E, generator=g) + 1,
                                  w2_input_scale=torch.rand(E, generator=g) + 1)
        x, tol = torch.randn(6, 64, generator=g).bfloat16(), 2e-2
    lg = torch.randn(6, E, generator=g)
    with torch.no_grad():
        ref = layer(x, lg)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        monkeypatch.setattr(torch.Tensor, "tolist", _refuse_tolist)
        with _NoHostReads():
            out = layer(x, lg)
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)  # the dense loop: GEMM blocking apart


@pytest.mark.parametrize("on_input", [False, True])
def test_dense_chunks_of_four_and_more_with_id_0_held_elsewhere(monkeypatch, on_input):
    # review: compiled_chunks at n >= 4 chunks (T in (2·most, 4·most] and beyond), padded rows routed to id 0 that
    # this rank does not hold (expert_map[0] = -1) and, on the weight-on-input path, run (not dead): the dense path (taken
    # while compiling or capturing) equals the eager loop on every real row
    x, w13, w2, w, ids = _experts(37, 3, 2, 32, 16, num_global=6)
    emap = torch.tensor([-1, 0, -1, 1, 2, -1], dtype=torch.int32)
    kw = dict(apply_router_weight_on_input=on_input, expert_map=emap, workspace_bytes=6000)
    k = 1 if on_input else 2
    eager = ops_experts.experts_reference(x, w13, w2, w[:, :k], ids[:, :k], **kw)
    monkeypatch.setattr(ops_experts, "host_sync_allowed", lambda: False)
    for t in (37, 18, 9):  # 8, 4 and 2 chunks of the dense bound here (5 tokens at K = 2, 8 at K = 1)
        dense = ops_experts.experts_reference(x[:t], w13, w2, w[:t, :k], ids[:t, :k], **kw)
        torch.testing.assert_close(dense, eager[:t], atol=1e-5, rtol=1e-5)
