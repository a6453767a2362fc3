"""Round 63's audit: defects found by review helpers and checked with repros (module lifecycle: parametrized,
cast, emptied and assigned layers; routing: the sigmoid's gradient at 0, a NaN selection bias on the Triton path,
hash tables past E, the routers' argument checks; the interpreter's rounding of the on-input weight)."""

import pytest
import torch
import torch.nn.utils.parametrize as parametrize

import moekit
from moekit.ops.routing import compute_scores
from moekit.routing.custom import CustomRoutingRouter
from moekit.routing.zero_expert import ZeroExpertRouter

E, K, H, I = 4, 2, 32, 16
FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def _layer(dtype=torch.float32, load=True, **kw):
    layer = moekit.FusedMoE(E, K, H, I, params_dtype=dtype, backend="torch", **kw)
    if load:
        g = torch.Generator().manual_seed(0)
        w13, w2 = torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)
        bias = (torch.randn(E, 2 * I, generator=g), torch.randn(E, H, generator=g)) if kw.get("has_bias") else ()
        layer.load_expert_weights(w13, w2, *bias)
    return layer


class _Double(torch.nn.Module):
    def forward(self, w):
        return w * 2


def test_a_load_into_a_parametrized_weight_is_refused():
    # the edge: the write went into the parametrization's computed tensor, the layer said loaded and returned NaN
    layer = _layer(load=False)
    parametrize.register_parametrization(layer.routed_experts, "w2_weight", _Double())
    with pytest.raises(TypeError, match="w2_weight .* is parametrized"):
        layer.load_expert_weights(torch.randn(E, 2 * I, H), torch.randn(E, H, I))
    with pytest.raises(TypeError, match="w2_weight .* is parametrized"):
        layer.routed_experts.load_expert_shard(0, "w2", torch.randn(H, I))


def test_a_state_dict_into_a_parametrized_layer_counts_its_original():
    # the edge: the plain key was marked loaded though torch did not copy it (it is unexpected there); the
    # parametrization's own 'original' entry is what loads
    src = _layer()
    x, logits = torch.randn(3, H), torch.randn(3, E)
    plain = _layer(load=False)
    parametrize.register_parametrization(plain.routed_experts, "w2_weight", _Double())
    result = plain.load_state_dict(src.state_dict(), strict=False)
    assert "routed_experts.w2_weight" in result.unexpected_keys
    assert not plain.routed_experts.loaded  # w2's original was never written
    with pytest.raises(RuntimeError, match="w2"):
        plain(x, logits)
    saved = _layer()
    parametrize.register_parametrization(saved.routed_experts, "w2_weight", _Double())
    again = _layer(load=False)
    parametrize.register_parametrization(again.routed_experts, "w2_weight", _Double())
    again.load_state_dict(saved.state_dict())
    assert again.routed_experts.loaded
    torch.testing.assert_close(again(x, logits), saved(x, logits), rtol=0, atol=0)


def test_a_quantised_layers_cast_keeps_its_bias_parameters():
    # the edge: .float() replaced the biases by new frozen Parameters (an optimizer kept the old ones)
    layer = moekit.FusedMoE(E, K, 256, 128, params_dtype=torch.bfloat16, quant_config=FP8, backend="torch",
                            has_bias=True)
    layer.load_expert_weights(torch.randn(E, 256, 256) * 0.05, torch.randn(E, 256, 128) * 0.05,
                              torch.randn(E, 256), torch.randn(E, 256))
    experts = layer.routed_experts
    experts.w13_bias.requires_grad_(True)
    experts.w13_bias.grad = torch.ones_like(experts.w13_bias)
    before = experts.w13_bias
    layer.float()
    assert experts.w13_bias is before and before.requires_grad and before.dtype == torch.float32
    assert before.grad.dtype == torch.float32 and experts.w2_bias.dtype == torch.float32


@pytest.mark.parametrize("quant", [None, FP8])
def test_to_empty_of_a_loaded_layer_forgets_its_weights(quant):
    # the edge: to_empty (uninitialised memory) on a layer with values kept it "loaded": the forward ran on garbage
    h, i = (256, 128) if quant else (H, I)
    layer = moekit.FusedMoE(E, K, h, i, params_dtype=torch.bfloat16 if quant else torch.float32, quant_config=quant,
                            backend="torch")
    layer.load_expert_weights(torch.randn(E, 2 * i, h) * 0.05, torch.randn(E, h, i) * 0.05)
    layer.to(torch.float64 if quant is None else torch.float32)  # a cast keeps the values (and the record)
    assert layer.routed_experts.loaded
    layer.to_empty(device="cpu")
    assert not layer.routed_experts.loaded
    with pytest.raises(RuntimeError, match="before the expert weights were loaded"):
        layer(torch.randn(2, h, dtype=layer.routed_experts.params_dtype), torch.randn(2, E))


def test_to_empty_of_an_eplb_state_rebuilds_its_maps():
    # the edge: only a state leaving the meta device was rebuilt; a state with values kept garbage maps
    from moekit.parallel.eplb_state import EplbState
    from moekit.experts.placement import ExpertPlacement
    state = EplbState(ExpertPlacement.single(4), window_size=3)
    maps = state.physical_to_logical.clone(), state.logical_to_physical.clone()
    with torch.no_grad():
        state.load_window.fill_(7)
    state.to_empty(device="cpu")
    assert torch.equal(state.physical_to_logical, maps[0]) and torch.equal(state.logical_to_physical, maps[1])
    assert int(state.load_window.abs().sum()) == 0 and int(state.step) == 0


@pytest.mark.parametrize("case", ["mixed", "int", "quant_bias"])
def test_an_assigning_load_with_dtypes_the_layer_cannot_run_is_refused(case):
    # the edge: load_state_dict(assign=True) kept the tensors as given; the forward failed deep in torch
    if case == "quant_bias":
        src = moekit.FusedMoE(E, K, 256, 128, params_dtype=torch.bfloat16, quant_config=FP8, backend="torch",
                              has_bias=True)
        src.load_expert_weights(torch.randn(E, 256, 256) * 0.05, torch.randn(E, 256, 128) * 0.05,
                                torch.randn(E, 256), torch.randn(E, 256))
        sd = {k: v.float() if "bias" in k else v for k, v in src.state_dict().items()}
        dst = moekit.FusedMoE(E, K, 256, 128, params_dtype=torch.bfloat16, quant_config=FP8, backend="torch",
                              has_bias=True)
        want = "w13_bias' \\(given\\) is torch.float32, but the layer's params_dtype would be torch.bfloat16"
    else:
        sd = _layer(has_bias=True).state_dict()
        key = "routed_experts.w2_weight"
        sd[key] = sd[key].bfloat16() if case == "mixed" else sd[key].long()
        dst = _layer(load=False, has_bias=True)
        want = "w2_weight' \\(given\\) is torch." + ("bfloat16, but" if case == "mixed" else "int64, not a float")
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(TypeError, match=want):
        dst.load_state_dict(sd, assign=True)
    after = dst.state_dict()
    assert all(torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8)) for k in before)  # nothing moved


def test_an_assigning_load_of_one_dtype_still_loads():
    # the edge the check must not refuse: every tensor one (other) float dtype
    sd = {k: v.double() if v.is_floating_point() else v for k, v in _layer(has_bias=True).state_dict().items()}
    dst = _layer(load=False, has_bias=True)
    dst.load_state_dict(sd, assign=True)
    assert dst.routed_experts.loaded and dst.routed_experts.params_dtype == torch.float64


def test_sigmoid_scores_have_the_sigmoids_gradient_at_zero():
    # the edge: e^-|x| took abs's gradient 0 at x = 0, so a zero-initialised sigmoid gate got no gradient
    x = torch.tensor([[0.0, -0.0, 1e-30, -3.0, 40.0, -100.0]], requires_grad=True)
    compute_scores(x, "sigmoid").sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    torch.sigmoid(ref).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-6, atol=1e-12)
    edges = torch.tensor([0.0, -0.0, 1e-40, -1e-40, float("inf"), -float("inf")])
    y = torch.cat([torch.linspace(-120, 120, 4001), edges])
    z = torch.exp(-y.abs())  # the forward before the change: bit for bit the same scores
    before = torch.where(y >= 0, (z + 1.0).reciprocal(), z / (z + 1.0))
    assert torch.equal(compute_scores(y[None], "sigmoid")[0], before)


@pytest.mark.interpreter
@pytest.mark.parametrize("grouped", [False, True])
def test_a_nan_selection_bias_gives_nan_weights_on_triton(grouped):
    # the edge: the kernel read a NaN bias as -inf and routed around that expert with finite weights
    logits = torch.randn(3, 8)
    bias = torch.zeros(8)
    bias[5] = float("nan")
    if grouped:
        w, ids = moekit.grouped_topk(None, logits, 2, True, 4, 2, e_score_correction_bias=bias, backend="triton")
    else:
        w, ids = moekit.fused_topk_bias(None, logits, bias, 2, True, backend="triton")
    assert bool(w.isnan().all()) and int(ids.min()) >= 0 and int(ids.max()) < 8
    with pytest.raises(ValueError, match="non-finite"):
        moekit.fused_topk_bias(None, logits, bias, 2, True, backend="torch")


@pytest.mark.interpreter
def test_a_hash_table_id_past_e_is_refused_on_triton():
    # the edge: only the torch path checked the table's values; the Triton path gathered past E
    table = torch.tensor([[0, 1], [2, 9], [3, 4]])
    logits = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"\[0, 8\), got \[2, 9\]"):
        moekit.fused_topk_bias(None, logits, None, 2, True, hash_indices_table=table,
                               input_tokens=torch.tensor([1, 1]), backend="triton")
    w, ids = moekit.fused_topk_bias(None, logits, None, 2, True, hash_indices_table=table,
                                    input_tokens=torch.tensor([0, 2]), backend="triton")  # rows in range: routes
    assert ids.tolist() == [[0, 1], [3, 4]]


def test_a_router_refuses_hidden_states_of_another_rank():
    # the edge: [B, 1, H] broadcast the zero experts' term into [B, B, H] (tokens mixed)
    router = ZeroExpertRouter(2, 4, e_score_correction_bias=torch.zeros(6))
    with pytest.raises(ValueError, match=r"hidden_states must have shape \[T, H\], got \[3, 1, 5\]"):
        router.route(torch.randn(3, 1, 5), torch.randn(3, 6))


def test_a_zero_expert_router_refuses_more_real_experts_than_e():
    # the edge: ids in [global_num_experts, num_logical_experts) came back as experts past E
    with pytest.raises(ValueError, match="num_logical_experts=10 exceeds global_num_experts=8"):
        ZeroExpertRouter(2, 8, e_score_correction_bias=torch.zeros(12), num_logical_experts=10)


def test_a_custom_routing_function_returning_a_list_is_a_type_error():
    # the edge: a non-tensor return raised ValueError
    router = CustomRoutingRouter(1, 4, custom_routing_function=lambda h, g, k, r: (g[:, :1], [[0]] * g.shape[0]))
    with pytest.raises(TypeError, match="topk_ids of type list, expected a torch.Tensor"):
        router.route(torch.randn(2, 8), torch.randn(2, 4))


@pytest.mark.interpreter
def test_the_interpreter_rounds_the_on_input_weight_to_nearest_even():
    # the edge: the interpreter truncated w · x to bf16 (the GPU rounds to nearest even): 3/20 seeds past tolerance
    g = torch.Generator().manual_seed(0)
    t, e, h, i = 32, 4, 64, 32
    x = torch.randn(t, h, generator=g).bfloat16()
    w13 = (torch.randn(e, 2 * i, h, generator=g) * 0.3).bfloat16()
    w2 = (torch.randn(e, h, i, generator=g) * 0.3).bfloat16()
    ids = torch.randint(0, e, (t, 1), generator=g).int()
    w = torch.rand(t, 1, generator=g) + 0.05
    out = moekit.fused_experts(x, w13, w2, w, ids, apply_router_weight_on_input=True, backend="triton")
    rounded = (x.float() * w).bfloat16()  # torch's cast: nearest even
    ref = moekit.fused_experts(rounded, w13, w2, torch.ones(t, 1), ids, apply_router_weight_on_input=True,
                               backend="triton")
    assert torch.equal(out, ref)


@pytest.mark.parametrize("activation, on_input", [("silu", False), ("relu2", False), ("swigluoai", False),
                                                  ("silu", True)])
def test_the_float64_twin_computes_in_float64(activation, on_input):
    # the edge: float64 in and out, but the activation, weighting and top-k sum ran in float32 (1e-7 apart from a
    # float64 loop where float64 gives 1e-15): the twin is the float64 oracle the tolerances are tested against
    from reference import ref_expert
    g = torch.Generator().manual_seed(1)
    t, e, h, i, k = 7, 5, 24, 12, 1 if on_input else 3
    rows = i if activation == "relu2" else 2 * i
    x, w13 = torch.randn(t, h, generator=g, dtype=torch.float64), torch.randn(e, rows, h, generator=g,
                                                                              dtype=torch.float64) * 0.3
    w2 = torch.randn(e, h, i, generator=g, dtype=torch.float64) * 0.3
    w = torch.rand(t, k, generator=g) + 0.1
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).int()
    out = moekit.fused_experts(x, w13, w2, w, ids, activation=activation, apply_router_weight_on_input=on_input,
                               backend="torch")
    ref = torch.stack([sum(ref_expert(x[r] * w[r, j].double() if on_input else x[r], int(ids[r, j]), w13, w2,
                                      activation=activation) * (1.0 if on_input else w[r, j].double())
                           for j in range(k)) for r in range(t)])
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def _peak_scratch(fn) -> tuple[int, torch.Tensor]:
    """(peak bytes allocated during ``fn()`` on the CPU less its output's, the output), from the profiler's events."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    live = peak = 0
    for ev in sorted((ev for ev in prof.profiler.kineto_results.events() if ev.name() == "[memory]"),
                     key=lambda ev: ev.start_ns()):
        live += ev.nbytes()
        peak = max(peak, live)
    return peak - out.numel() * out.element_size(), out


@pytest.mark.parametrize("h, i, k, dtype, hot, bias", [
    (2048, 64, 8, torch.float32, True, False),  # a token's every slot on one expert: the old count's worst, 1.89x
    (2048, 64, 8, torch.bfloat16, True, True),  # with biases (o + b2: one more [n, H] buffer)
    (4096, 32, 1, torch.float16, True, False),  # fp16 (every operand upcast to f32)
    (512, 512, 8, torch.float32, False, True),  # spread over the experts, a wide I
    (1024, 64, 4, torch.float64, True, False),  # float64 (twice the bytes)
    (2048, 64, 8, torch.float32, "distinct", False),  # a router's distinct ids, expert 0 in every token: larger chunks
])
def test_the_torch_paths_scratch_stays_under_the_workspace(h, i, k, dtype, hot, bias):
    # the edge: the chunk size counted K (2H + 3I) f32 per token, the peak reached 1.9x workspace_bytes
    from moekit.ops.experts import fused_experts_torch
    g = torch.Generator().manual_seed(0)
    t, e, ws = 2048, 16 if hot == "distinct" else 4, 16 * 2**20
    x = torch.randn(t, h, generator=g).to(dtype)
    w13 = (torch.randn(e, 2 * i, h, generator=g) * 0.1).to(dtype)
    w2 = (torch.randn(e, h, i, generator=g) * 0.1).to(dtype)
    biases = dict(w1_bias=torch.randn(e, 2 * i, generator=g).to(dtype),
                  w2_bias=torch.randn(e, h, generator=g).to(dtype))
    if hot == "distinct":
        ids = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(e - 1, generator=g)[:k - 1]])
                           for _ in range(t)]).int()
    else:
        ids = (torch.zeros(t, k) if hot else torch.randint(0, e, (t, k), generator=g)).int()
    w = torch.rand(t, k, generator=g) + 0.1
    scratch, out = _peak_scratch(lambda: fused_experts_torch(x, w13, w2, w, ids, workspace_bytes=ws,
                                                             **(biases if bias else {})))
    assert scratch <= ws, f"{scratch / 2**20:.1f} MiB > {ws / 2**20:.0f} MiB"
    one = fused_experts_torch(x, w13, w2, w, ids, workspace_bytes=1 << 40, **(biases if bias else {}))
    tol = {torch.float64: 1e-13, torch.float32: 1e-6, torch.float16: 1e-3}.get(dtype, 1e-2)  # (SPEC §9's torch path)
    rel = float((out.double() - one.double()).norm() / one.double().norm())  # relative RMS: CPU GEMM blocking only
    assert rel <= tol, rel


def test_a_public_function_on_the_torch_backend_compiles_fullgraph():
    # the edge: kernels_for's lru_cache was traced into the table's construction (inspect.signature): no fullgraph
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    x, logits = torch.randn(5, 32, generator=g), torch.randn(5, 8, generator=g)
    w1, w2 = torch.randn(8, 32, 32, generator=g) * 0.2, torch.randn(8, 32, 16, generator=g) * 0.2

    def step(x, logits):
        w, ids, _ = moekit.fused_topk(x, logits, 2, True, backend="torch")
        return moekit.fused_experts(x, w1, w2, w, ids, backend="torch")

    out = torch.compile(step, fullgraph=True, backend="aot_eager")(x, logits)
    torch.testing.assert_close(out, step(x, logits))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_compiled_hash_routing_marks_invalid_ids_nan(backend):
    # the edge: compiled, the torch path read row -1 (the table's last) for an id of -1, and raised IndexError past it
    g = torch.Generator().manual_seed(0)
    table = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(50)])
    layer = moekit.FusedMoE(8, 2, 32, 16, params_dtype=torch.float32, backend=backend, hash_indices_table=table)
    table[7] = torch.tensor([1, 9])  # a row holding an id past E (the table is kept by reference: changed in place)
    layer.load_expert_weights(torch.randn(8, 32, 32, generator=g) * 0.2, torch.randn(8, 32, 16, generator=g) * 0.2)
    x, logits = torch.randn(4, 32, generator=g), torch.randn(4, 8, generator=g)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        out = compiled(x, logits, input_ids=torch.tensor([1, -1, 50, 7]))
        ref = layer(x[:1], logits[:1], input_ids=torch.tensor([1]))
    assert out[1:].isnan().all() and torch.allclose(out[:1], ref)
    with pytest.raises(ValueError, match="input_ids"):
        layer(x, logits, input_ids=torch.tensor([1, -1, 3, 4]))  # eager: refused


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_a_layer_runs_under_fake_tensor_mode(backend):
    # the edge: the value checks read fake tensors' values (fake tensors report a real device): shape inference failed
    from torch._subclasses.fake_tensor import FakeTensorMode
    layer = moekit.FusedMoE(8, 2, 32, 16, params_dtype=torch.float32, backend=backend,
                            hash_indices_table=torch.randint(0, 8, (20, 2)))
    layer.load_expert_weights(torch.randn(8, 32, 32) * 0.2, torch.randn(8, 32, 16) * 0.2)
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = layer(torch.empty(6, 32), torch.empty(6, 8), input_ids=torch.zeros(6, dtype=torch.long))
    assert out.shape == (6, 32)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_a_symbolic_swiglu_limit_compiles(backend):
    # the edge: under dynamic=True the float is a SymFloat and the re-validation (math.isfinite) failed the trace
    g = torch.Generator().manual_seed(0)
    x, w1 = torch.randn(5, 32, generator=g), torch.randn(8, 32, 32, generator=g) * 0.2
    w2 = torch.randn(8, 32, 16, generator=g) * 0.2
    w, ids = torch.rand(5, 2, generator=g), torch.randint(0, 8, (5, 2), generator=g)

    def step(s):
        return moekit.fused_experts(x, w1, w2, w, ids, activation="swigluoai", swiglu_limit=s * 2.8, backend=backend)

    torch._dynamo.reset()
    out = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=True)(2.5)
    torch.testing.assert_close(out, step(2.5))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_a_table_changed_in_place_past_e_is_refused_eagerly(backend):
    # the edge (the round's review): the table is kept by reference; an id past E written after construction reached
    # the gather on the torch path (IndexError) while the Triton path named it
    table = torch.randint(0, 8, (20, 2), generator=torch.Generator().manual_seed(0))
    layer = moekit.FusedMoE(8, 2, 32, 16, params_dtype=torch.float32, backend=backend, hash_indices_table=table)
    layer.load_expert_weights(torch.randn(8, 32, 32) * 0.2, torch.randn(8, 32, 16) * 0.2)
    table[3] = torch.tensor([2, 9])
    with pytest.raises(ValueError, match=r"hash_indices_table values must lie in \[0, 8\), got \[2, 9\]"):
        layer(torch.randn(2, 32), torch.randn(2, 8), input_ids=torch.tensor([3, 3]))


@pytest.mark.parametrize("scale", [float("nan"), -2.0])
def test_a_compiled_public_function_still_checks_its_numbers(scale):
    # the edge (the round's review of the first fix): skipping the checks while compiling let a NaN or negative
    # scaling factor through; finiteness is now written as comparisons, which a trace of a symbolic float takes
    x, logits, bias = torch.randn(3, 16), torch.randn(3, 8), torch.zeros(8)
    torch._dynamo.reset()
    step = torch.compile(lambda s: moekit.fused_topk_bias(x, logits, bias, 2, True, "sigmoid", s, backend="torch"),
                         backend="aot_eager")
    with pytest.raises(Exception, match="routed_scaling_factor must be"):
        step(scale)


@pytest.mark.interpreter
@pytest.mark.parametrize("bad", [(1 << 32) + 1, -(1 << 32) + 2, 1 << 40])
def test_an_int64_id_past_int32_is_a_dead_slot_on_triton(bad):
    # the edge: the align step cast the id to 32 bits before its range test, so 2^32 + 1 was read as expert 1
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 32, generator=g), torch.rand(2, 2, generator=g) + 0.1
    w1, w2 = torch.randn(4, 32, 32, generator=g) * 0.2, torch.randn(4, 32, 16, generator=g) * 0.2
    ids = torch.tensor([[0, 1], [2, 3]])
    odd, dead = ids.clone(), ids.clone()
    odd[0, 1], dead[0, 1] = bad, -1
    out = moekit.fused_experts(x, w1, w2, w, odd, backend="triton")
    assert torch.equal(out, moekit.fused_experts(x, w1, w2, w, dead, backend="triton"))


def test_a_config_file_bucket_of_other_digits_names_the_file(tmp_path):
    # the edge: "²".isdigit() is True but int("²") raised a bare ValueError naming no file
    import json
    from moekit.ops.triton_configs import ConfigFileError, read_config_file
    path = tmp_path / "NVIDIA_H200.json"
    path.write_text(json.dumps({"device": "NVIDIA H200", "entries": {"E=8,H=64,I=64,K=2,bf16": {"²": {}}}}))
    with pytest.raises(ConfigFileError, match="bucket '²', expected a token count"):
        read_config_file(path)
