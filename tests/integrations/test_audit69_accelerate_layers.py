"""Round 69: moekit layers under Hugging Face accelerate's big-model inference, and loaded by transformers'
``from_pretrained``. Offloaded (meta) expert weights that an accelerate hook on the routed experts brings back were
refused by the layer's device check before the hook ran; parameters assigned from outside the layer's loaders
(``from_pretrained``'s ``setattr``, accelerate's ``_parameters[name] = ...``) were refused as "not loaded"."""

import shutil
import warnings

import pytest
import torch

import moekit

accelerate = pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

E, K, H, I = 8, 2, 32, 16


def _layer(dtype=torch.float32, **kw):
    g = torch.Generator().manual_seed(0)
    layer = moekit.FusedMoE(E, K, H, I, params_dtype=dtype, gate=torch.nn.Linear(H, E, bias=False, dtype=dtype),
                            **kw)
    layer.load_expert_weights((torch.randn(E, 2 * I, H, generator=g) / 6).to(dtype),
                              (torch.randn(E, H, I, generator=g) / 4).to(dtype))
    return layer


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.inp = torch.nn.Linear(H, H)
        self.moe = _layer()

    def forward(self, x):
        return self.moe(self.inp(x))


def _x(t=5):
    return torch.randn(t, H, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload", "dispatch_disk", "experts_disk"])
def test_offloaded_layer_runs(tmp_path, how):
    # the offloaded experts are on meta until accelerate's hook on routed_experts brings them: the layer's own device
    # check refused them ("hidden_states is on cpu but the expert weights are on meta"), in every offloading mode
    net = Net().eval()
    with torch.no_grad():
        ref = net(_x())
    if how == "cpu_offload":
        accelerate.cpu_offload(net, "cpu")
    elif how == "disk_offload":
        accelerate.disk_offload(net, str(tmp_path), "cpu")
    elif how == "dispatch_disk":
        accelerate.dispatch_model(net, {"inp": "cpu", "moe": "disk"}, "cpu", offload_dir=str(tmp_path))
    else:  # only the experts offloaded: the natural way to offload an MoE
        accelerate.dispatch_model(net, {"inp": "cpu", "moe.gate": "cpu", "moe.router": "cpu",
                                        "moe.routed_experts": "disk"}, "cpu", offload_dir=str(tmp_path))
    assert net.moe.routed_experts.w13_weight.is_meta
    with torch.no_grad():
        for _ in range(2):  # twice: the hook loads fresh tensors each call
            assert torch.equal(net(_x()), ref)


def test_meta_weights_without_a_hook_are_refused_clearly():
    # weights on meta and nothing to bring them back: the experts say so (not the meta tensor's torch error)
    layer = _layer()
    layer.routed_experts.to("meta")
    with pytest.raises(RuntimeError, match="meta device"):
        layer(_x())


class _Cfg(transformers.PretrainedConfig):
    model_type = "moekit_audit69"


class _Model(transformers.PreTrainedModel):
    config_class = _Cfg

    def __init__(self, config, **kw):
        super().__init__(config)
        self.inp = torch.nn.Linear(H, H)
        self.moe = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float32, gate=torch.nn.Linear(H, E, bias=False),
                                   **kw)
        self.post_init()

    def forward(self, x):
        return self.moe(self.inp(x))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    m = _Model(_Cfg()).eval()
    g = torch.Generator().manual_seed(0)
    m.moe.load_expert_weights(torch.randn(E, 2 * I, H, generator=g) / 6, torch.randn(E, H, I, generator=g) / 4)
    with torch.no_grad():
        ref = m(_x())
    d = tmp_path_factory.mktemp("model")
    m.save_pretrained(d)
    yield m, ref, d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("device_map", [None, {"": "cpu"}])
def test_from_pretrained_loads_a_model_holding_a_layer(saved, device_map):
    # transformers loads by setattr of new Parameters: the loaded-record never saw the writes and every forward was
    # refused as "forward before the expert weights were loaded"
    _, ref, d = saved
    m = _Model.from_pretrained(d, device_map=device_map).eval()
    with torch.no_grad():  # (the file's tensors are other memory: BLAS may sum another way, ~1e-9)
        torch.testing.assert_close(m(_x()), ref, rtol=1e-5, atol=1e-7)


def test_load_checkpoint_and_dispatch(saved):
    # accelerate writes module._parameters[name] directly (init_empty_weights + load_checkpoint_and_dispatch)
    _, ref, d = saved
    with accelerate.init_empty_weights():
        m = _Model(_Cfg()).eval()
    m = accelerate.load_checkpoint_and_dispatch(m, str(d), device_map={"": "cpu"})
    with torch.no_grad():
        torch.testing.assert_close(m(_x()), ref, rtol=1e-5, atol=1e-7)


def test_assigned_never_loaded_values_are_refused(saved):
    # an assigned parameter holding a never-loaded layer's values (NaN) is not a load
    m, _, _ = saved
    layer = _layer()
    fresh = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float32, gate=torch.nn.Linear(H, E, bias=False))
    fresh.routed_experts.w13_weight = torch.nn.Parameter(layer.routed_experts.w13_weight.detach().clone())
    fresh.routed_experts.w2_weight = torch.nn.Parameter(torch.full_like(layer.routed_experts.w2_weight, float("nan")))
    with pytest.raises(RuntimeError, match="not loaded|before the expert weights were loaded"):
        fresh(_x())


def test_a_missing_assignment_stays_refused():
    # only w13 assigned: w2 is the layer's own, never written -> still refused, naming w2
    layer = _layer()
    fresh = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float32, gate=torch.nn.Linear(H, E, bias=False))
    fresh.routed_experts.w13_weight = torch.nn.Parameter(layer.routed_experts.w13_weight.detach().clone())
    with pytest.raises(RuntimeError, match="w2"):
        fresh(_x())


def test_unloaded_biases_stay_refused():
    # has_bias: weights assigned, biases (the layer's own zeros) never written -> refused (zeros are a value, so only
    # the loaded-record can tell)
    layer = _layer()
    fresh = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float32, gate=torch.nn.Linear(H, E, bias=False),
                            has_bias=True)
    for name in ("w13_weight", "w2_weight"):
        setattr(fresh.routed_experts, name, torch.nn.Parameter(getattr(layer.routed_experts, name).detach().clone()))
    with pytest.raises(RuntimeError, match="bias"):
        fresh(_x())


def test_functional_call_restoring_the_own_tensors_is_refused_again():
    # a functional_call with another loaded layer's parameters runs; after it the layer's own (never loaded) are
    # back, and the answer for the assigned ones (cached by identity) must not carry over
    loaded = _layer()
    fresh = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float32, gate=torch.nn.Linear(H, E, bias=False))
    params = {f"routed_experts.{n}": getattr(loaded.routed_experts, n) for n in ("w13_weight", "w2_weight")}
    params["gate.weight"] = loaded.gate.weight
    with torch.no_grad():
        out = torch.func.functional_call(fresh, params, (_x(),))
        assert torch.equal(out, loaded(_x()))
    with pytest.raises(RuntimeError, match="before the expert weights were loaded"):
        fresh(_x())


def test_assigned_wrong_shape_is_named():
    # an assignment of the wrong shape: a ValueError naming the tensor and the shapes (not torch's matmul error)
    fresh = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float32, gate=torch.nn.Linear(H, E, bias=False))
    fresh.routed_experts.w13_weight = torch.nn.Parameter(torch.zeros(E, 2 * I, H + 1))
    fresh.routed_experts.w2_weight = torch.nn.Parameter(torch.zeros(E, H, I))
    with pytest.raises(ValueError, match=r"w13_weight .*\[8, 32, 33\]"):
        fresh(_x())


def test_assigned_float16_4bit_out_of_range_is_refused():
    # a float16 mxfp4 layer: assigned codes and scales whose dequantised weights pass float16's range are refused,
    # as load_state_dict(assign=True) refuses them (every routed token came out NaN)
    q = {"quant_method": "mxfp4"}
    src = moekit.FusedMoE(E, K, 64, 64, params_dtype=torch.float16, quant_config=q,
                          gate=torch.nn.Linear(64, E, bias=False, dtype=torch.float16))
    g = torch.Generator().manual_seed(0)
    src.load_expert_weights(torch.randn(E, 128, 64, generator=g).half(), torch.randn(E, 64, 64, generator=g).half())
    fresh = moekit.FusedMoE(E, K, 64, 64, params_dtype=torch.float16, quant_config=q,
                            gate=torch.nn.Linear(64, E, bias=False, dtype=torch.float16))
    for name, t in src.routed_experts.expert_tensors().items():
        t = t.detach().clone()
        if name == "w2_scale":
            t[3] = 127 + 20  # 2^20 · 6 > 65504
        setattr(fresh.routed_experts, name, torch.nn.Parameter(t, requires_grad=False))
    with pytest.raises(ValueError, match="float16"):
        fresh(torch.randn(3, 64).half())
