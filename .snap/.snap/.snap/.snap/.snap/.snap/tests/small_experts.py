"""A small random experts problem for the kernel tests that compare two configs bit for bit (``w13_split``,
swapped tiles): the values only have to exercise every epilogue, so one generator serves them all."""

import torch

from moekit.ops.formats import Fp8BlockFormat, Fp8ChannelFormat, Int4GroupFormat, Mxfp4Format

DEV = "cuda" if torch.cuda.is_available() else "cpu"
E, K, H, I, T = 4, 2, 64, 96, 7  # I = 96: a partial 64-column block; T * K = 14 slots over 4 experts

# (dtype, activation, bias): each gated epilogue once, fp32 (exact dots) and bf16, and a non-gated one
EPILOGUES = [(torch.bfloat16, "silu", False), (torch.float32, "swigluoai", True), (torch.bfloat16, "gelu_tanh", True),
             (torch.bfloat16, "silu_post_clamp", False), (torch.bfloat16, "relu2", True)]

# formats of the bit-for-bit config tests, with the w13 BN that exercises each: (format, BN)
FORMATS = {
    "fp8_block_fused_requant": (Fp8BlockFormat(64, 64), 64),  # BN = bk: re-quantised in the epilogue
    "fp8_block_separate_requant": (Fp8BlockFormat(64, 64), 32),  # narrow tiles: a separate pass
    "fp8_block_ue8m0": (Fp8BlockFormat(32, 32, ue8m0=True), 32),
    "fp8_channel": (Fp8ChannelFormat(), 64),
    "fp8_static": (Fp8ChannelFormat(per_tensor=True, static_input=True), 64),
    "mxfp4": (Mxfp4Format(), 32),
    "int4_g32": (Int4GroupFormat(32), 32),
}


def experts_problem(dtype, act, bias, seed=0, t=T, e=E, h=H, i=I, k=K):
    """``(w13, w2, x, topk_weights, topk_ids, b1, b2)``: weights on the CPU in ``dtype`` (callers quantise
    or move them), the rest on :data:`DEV`; biases None without ``bias``."""
    g = torch.Generator().manual_seed(seed)
    rows = i if act == "relu2" else 2 * i
    w13, w2 = torch.randn(e, rows, h, generator=g) / h**0.5, torch.randn(e, h, i, generator=g) / i**0.5
    x = torch.randn(t, h, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).int()
    w = torch.rand(t, k, generator=g) + 0.05
    b1 = (torch.randn(e, rows, generator=g) * 0.1).to(dtype) if bias else None
    b2 = (torch.randn(e, h, generator=g) * 0.1).to(dtype) if bias else None
    to = lambda v: v.to(DEV) if v is not None else None  # noqa: E731
    return w13.to(dtype), w2.to(dtype), to(x), to(w), to(ids), to(b1), to(b2)


def quantised_call(fmt, seed=1):
    """``(spec, run)`` for the swigluoai + bias problem quantised to ``fmt`` (static fp8 inputs get fixed input
    scales): ``run(config)`` is the quantised experts call with that kernel config."""
    from moekit.ops import triton_experts_quant as tq
    from moekit.ops.quantize import quantize_experts

    w13, w2, x, w, ids, b1, b2 = experts_problem(torch.bfloat16, "swigluoai", True, seed=seed)
    q13, q2, s13, s2 = (v.to(DEV) for v in quantize_experts(w13, w2, fmt))
    s_in = (None, None)
    if getattr(fmt, "static_input", False):
        s_in = (torch.full((E,), 0.02, device=DEV), torch.full((E,), 0.01, device=DEV))
    spec = tq.QuantSpec.of(fmt)  # static inputs: spec.static from the format, as s_in

    def run(config):
        return tq.fused_experts_quant_impl(x, q13, q2, w, ids, spec, s13, s2, *s_in, "swigluoai", False, b1, b2,
                                           None, 7.0, config=config)
    return spec, run


def quantised_same_bits(fmt, configs) -> bool:
    """The quantised problem (:func:`quantised_call`) run under each of ``configs``: all outputs the same bits."""
    _, run = quantised_call(fmt)
    outs = [run(c) for c in configs]
    return all(torch.equal(outs[0], o) for o in outs[1:])


def fp8_decode_call(t=2, e=16, k=8, h=1024, i=512, seed=5):
    """``(f, inputs)`` for the graph / compile tests of the fp8 decode kernels: ``f(x, w, ids)`` is the public quantised
    call (the custom op) on fp8 block (128 x 128) weights of a random problem, ``inputs()`` a fresh ``(x, w, ids)``
    decode batch (new routing: other experts, other rows of the inline layout) each time (CUDA)."""
    from moekit.ops import triton_experts_quant as tq
    from moekit.ops.formats import Fp8BlockFormat
    from moekit.ops.quantize import quantize_experts

    gen = torch.Generator(device="cuda").manual_seed(seed)
    w13 = torch.randn(e, 2 * i, h, device="cuda", generator=gen) * h ** -0.5
    w2 = torch.randn(e, h, i, device="cuda", generator=gen) * i ** -0.5
    fmt = Fp8BlockFormat(128, 128)
    q13, q2, s13, s2 = quantize_experts(w13.bfloat16(), w2.bfloat16(), fmt)

    def f(x, w, ids):
        return tq.fused_experts_quant_triton(x, q13, q2, w, ids, fmt=fmt, w13_scale=s13, w2_scale=s2)

    def inputs():
        x = torch.randn(t, h, device="cuda", generator=gen).bfloat16()
        ids = torch.stack([torch.randperm(e, device="cuda", generator=gen)[:k] for _ in range(t)]).int()
        return x, torch.rand(t, k, device="cuda", generator=gen) + 0.1, ids

    return f, inputs


def assert_compiled_and_graphed_bits(f, inputs, new_inputs) -> None:
    """``torch.compile(f, fullgraph=True)`` on ``inputs`` gives ``f``'s eager bits, and a CUDA graph of ``f`` captured
    on copies of ``inputs`` and replayed after copying ``new_inputs`` in gives ``f(*new_inputs)``'s (CUDA only)."""
    ref = f(*inputs)
    assert torch.equal(torch.compile(f, fullgraph=True)(*inputs), ref)
    static = [v.clone() for v in inputs]
    f(*static)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = f(*static)
    for dst, src in zip(static, new_inputs):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, f(*new_inputs))


def count_calls(monkeypatch, owner, name: str) -> list:
    """Record every call of ``owner.name`` (which still runs and returns what it returns): one list entry per
    call."""
    calls, real = [], getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    return calls


def quantised_run(fmt, act, bias, *, t, e, h, i, k, hot=False, emap=False, on_input=False, limit=None, seed=3):
    """``run(config) -> [T, H]``: the quantised Triton launcher (``fused_experts_quant_impl``) on one GPU
    problem of :func:`experts_problem` with weights in ``fmt``, so that configs can be compared bit for bit.
    ``hot``: half the tokens on experts 0 .. k-1 (one expert's rows over many blocks); ``emap``: experts
    0 .. e/2 - 1 local, in order, the others dead (expert parallelism)."""
    from moekit.ops import triton_experts_quant as tq
    from moekit.ops.quantize import quantize_experts

    w13, w2, x, w, ids, b1, b2 = experts_problem(torch.bfloat16, act, bias, seed=seed, t=t, e=e, h=h, i=i, k=k)
    if hot:
        ids[: t // 2, 0] = 0
        ids[: t // 2, 1:] = torch.arange(1, k, device=ids.device, dtype=ids.dtype)
    q13, q2, s13, s2 = quantize_experts(w13.cuda(), w2.cuda(), fmt)
    spec = tq.QuantSpec.of(fmt)
    n = e // 2 if emap else e
    emap_t = None
    if emap:
        emap_t = torch.full((e,), -1, dtype=torch.int32, device="cuda")
        emap_t[:n] = torch.arange(n, dtype=torch.int32, device="cuda")
    b1, b2 = (b1[:n], b2[:n]) if bias else (None, None)

    def run(config):
        return tq.fused_experts_quant_impl(x, q13[:n], q2[:n], w, ids, spec, s13[:n], s2[:n], None, None, act,
                                           on_input, b1, b2, emap_t, limit, config=config)
    return run
