"""Round 68's audit of Python-side state under torch.compile (CPU, backend "eager"): each case failed before its fix."""

import pytest
import torch

import moekit

E, K, H, I = 8, 2, 32, 16


def _make(seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    gate = torch.nn.Linear(H, E, bias=False)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * 0.5)
    layer = moekit.FusedMoE(E, K, H, I, backend="torch", gate=gate, **kw).eval()
    layer.load_expert_weights(torch.randn(E, 2 * I, H, generator=g) * 0.2, torch.randn(E, H, I, generator=g) * 0.2)
    return layer


def _on_meta(**kw):
    with torch.device("meta"):
        gate = torch.nn.Linear(H, E, bias=False)
    kw = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    layer = moekit.FusedMoE(E, K, H, I, backend="torch", gate=gate, device="meta", **kw).eval()
    return layer.to_empty(device="cpu")


def _compiled(layer, fullgraph=True):
    torch._dynamo.reset()
    return torch.compile(layer, backend="eager", fullgraph=fullgraph)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    yield
    torch._dynamo.reset()


TABLE = torch.stack([torch.randperm(E, generator=torch.Generator().manual_seed(i))[:K] for i in range(50)])
ROUTERS = {"selection bias": dict(scoring_func="sigmoid", e_score_correction_bias=torch.linspace(0, 0.1, E)),
           "hash table": dict(hash_indices_table=TABLE)}


@pytest.mark.parametrize("kind", ROUTERS)
@pytest.mark.parametrize("load", ["state_dict", "load_weights"])
def test_meta_built_loaded_layer_compiles_fullgraph(kind, load):
    # build on meta, to_empty, load everything (the router's value buffer included), compile: the record of
    # to_empty values was cleared only by an eager forward, and its check (is_inference, a host read) failed tracing
    kw = ROUTERS[kind]
    ref = _make(**{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
    layer = _on_meta(**kw)
    sd = ref.state_dict()
    if load == "state_dict":
        layer.load_state_dict(sd)
    else:
        with torch.no_grad():
            layer.gate.weight.copy_(sd["gate.weight"])
        router = [(k, v) for k, v in sd.items() if k.startswith("router.")]
        layer.load_weights(router)
        layer.load_expert_weights(sd["routed_experts.w13_weight"], sd["routed_experts.w2_weight"])
    x, ids = torch.randn(5, H), torch.arange(5)
    extra = {"input_ids": ids} if kind == "hash table" else {}
    with torch.no_grad():
        assert torch.allclose(_compiled(layer)(x, **extra), ref(x, **extra), atol=1e-6)  # (a dense loop compiled)


def test_unloaded_router_value_refused_while_compiling():
    # a bias never written since to_empty: the compiled forward refuses with moekit's message (no value read)
    kw = ROUTERS["selection bias"]
    ref = _make(**{k: v.clone() for k, v in kw.items() if isinstance(v, torch.Tensor)}, scoring_func="sigmoid")
    layer = _on_meta(**kw)
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("router.")}
    layer.load_state_dict(sd, strict=False)
    with torch.no_grad(), pytest.raises(RuntimeError, match="e_score_correction_bias came from to_empty"):
        _compiled(layer, fullgraph=False)(torch.randn(3, H))


def test_eplb_layer_built_under_inference_mode_compiles_outside_it():
    # EPLB buffers made under inference_mode were inference tensors: a compiled forward outside it failed on the
    # in-place load record (eager handled it since round 49)
    with torch.inference_mode():
        eager, comp = _make(enable_eplb=True), _make(enable_eplb=True)
    assert not comp.router.eplb_state.step.is_inference()
    f = _compiled(comp)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(5, H, generator=g)
            assert torch.allclose(f(x), eager(x), atol=1e-6)
    a, b = eager.router.eplb_state, comp.router.eplb_state
    assert int(a.step) == int(b.step) == 3 and torch.equal(a.window_load(), b.window_load())


def test_custom_routing_layers_with_different_scales_compile_each():
    # the scaled-weights check's name was an f-string of routed_scaling_factor built while compiling: once dynamo
    # made the float symbolic (a second layer through the same code), fullgraph failed with BUILD_STRING
    def route(hidden_states, gating_output, topk, renormalize):
        w, ids = torch.topk(gating_output, topk, dim=-1)
        return torch.sigmoid(w.float()), ids

    x = torch.randn(5, H)
    layers = [_make(seed=i, routed_scaling_factor=s, custom_routing_function=route)
              for i, s in enumerate((2.5, 1.5, 0.5))]
    torch._dynamo.reset()
    with torch.no_grad():
        for layer in layers:
            assert torch.allclose(torch.compile(layer, backend="eager", fullgraph=True)(x), layer(x), atol=1e-6)


def test_select_experts_of_routers_without_zero_experts_compiles_fullgraph():
    # review of round 68: every router's select_experts went through the eager (disabled) side-channel write while
    # compiling; only zero-expert routers have a reader, the others keep a whole graph
    layer = _make()
    x, lg = torch.randn(4, H), torch.randn(4, E)
    f = torch.compile(lambda a, b: layer.router.select_experts(a, b), backend="eager", fullgraph=True)
    w, ids = f(x, lg)
    w0, ids0 = layer.router.select_experts(x, lg)
    assert torch.equal(ids, ids0) and torch.allclose(w, w0)


def test_router_value_written_in_place_is_seen_by_a_compiled_forward():
    # review of round 68: a bias written by copy_ (not a moekit load) after to_empty: the compiled forward (no
    # fullgraph) checks it in a graph break as before, rather than refusing it as never written
    kw = ROUTERS["selection bias"]
    ref = _make(**{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
    layer = _on_meta(**kw)
    sd = ref.state_dict()
    layer.load_state_dict({k: v for k, v in sd.items() if not k.startswith("router.")}, strict=False)
    with torch.no_grad():
        layer.router.e_score_correction_bias.copy_(sd["router.e_score_correction_bias"])
        x = torch.randn(5, H)
        assert torch.allclose(_compiled(layer, fullgraph=False)(x), ref(x), atol=1e-6)
