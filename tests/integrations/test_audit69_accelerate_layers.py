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

    def __init__(self, config):
        super().__init__(config)
        self.inp = torch.nn.Linear(H, H)
        self.moe = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float32, gate=torch.nn.Linear(H, E, bias=False),
                                   enable_eplb=getattr(config, "eplb", False))
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


def test_load_checkpoint_and_dispatch_stays_refused(saved):
    # accelerate writes module._parameters[name] directly (init_empty_weights + load_checkpoint_and_dispatch): moekit
    # cannot see that load, and the layer stays "not loaded" (documented; load_state_dict or from_pretrained work)
    _, _, d = saved
    with accelerate.init_empty_weights():
        m = _Model(_Cfg()).eval()
    m = accelerate.load_checkpoint_and_dispatch(m, str(d), device_map={"": "cpu"})
    with pytest.raises(RuntimeError, match="before the expert weights were loaded"):
        m(_x())


def test_from_pretrained_with_a_missing_key_is_refused(saved, tmp_path):
    # review of round 69: transformers fills a missing key with torch.empty_like (uninitialised memory, no
    # _is_hf_initialized mark): not a load, the forward names it
    import safetensors.torch as st

    _, _, d = saved
    state = st.load_file(str(d / "model.safetensors"))
    del state["moe.routed_experts.w2_weight"]
    shutil.copytree(d, tmp_path / "m")
    st.save_file(state, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    m = _Model.from_pretrained(tmp_path / "m").eval()
    with pytest.raises(RuntimeError, match="expert 0 w2"):
        m(_x())


def test_from_pretrained_of_an_eplb_layer_is_refused(tmp_path):
    # review of round 69: transformers assigns the placement buffers raw (and refills non-persistent maps with
    # empty_like): an EPLB layer's slots and routing maps came out wrong; refused, naming load_state_dict
    torch.manual_seed(0)
    m = _Model(_Cfg(eplb=True)).eval()
    g = torch.Generator().manual_seed(0)
    m.moe.load_expert_weights(torch.randn(E, 2 * I, H, generator=g) / 6, torch.randn(E, H, I, generator=g) / 4)
    m.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="placement.*load_state_dict"):
        _Model.from_pretrained(tmp_path)


def _hf(t):  # what from_pretrained assigns: a Parameter it read from the checkpoint, marked
    p = torch.nn.Parameter(t, requires_grad=t.is_floating_point())
    p._is_hf_initialized = True
    return p


def test_assigned_never_loaded_values_are_refused():
    # an assigned tensor holding a never-loaded layer's values (NaN) is not a load
    layer = _layer()
    fresh = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float32, gate=torch.nn.Linear(H, E, bias=False))
    fresh.routed_experts.w13_weight = _hf(layer.routed_experts.w13_weight.detach().clone())
    fresh.routed_experts.w2_weight = _hf(torch.full_like(layer.routed_experts.w2_weight, float("nan")))
    with pytest.raises(RuntimeError, match="before the expert weights were loaded"):
        fresh(_x())


def test_a_missing_assignment_stays_refused():
    # only w13 assigned: w2 is the layer's own, never written -> still refused, naming w2
    layer = _layer()
    fresh = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float32, gate=torch.nn.Linear(H, E, bias=False))
    fresh.routed_experts.w13_weight = _hf(layer.routed_experts.w13_weight.detach().clone())
    with pytest.raises(RuntimeError, match="w2"):
        fresh(_x())


def test_unloaded_biases_stay_refused():
    # has_bias: weights assigned, biases (the layer's own zeros) never written -> refused (zeros are a value, so only
    # the loaded-record can tell)
    layer = _layer()
    fresh = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float32, gate=torch.nn.Linear(H, E, bias=False),
                            has_bias=True)
    for name in ("w13_weight", "w2_weight"):
        setattr(fresh.routed_experts, name, _hf(getattr(layer.routed_experts, name).detach().clone()))
    with pytest.raises(RuntimeError, match="bias"):
        fresh(_x())


def test_unmarked_assignment_is_not_a_load():
    # a user's own assignment (no transformers mark) is not a load, as before round 69
    layer = _layer()
    fresh = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float32, gate=torch.nn.Linear(H, E, bias=False))
    for name in ("w13_weight", "w2_weight"):
        setattr(fresh.routed_experts, name, torch.nn.Parameter(getattr(layer.routed_experts, name).detach().clone()))
    with pytest.raises(RuntimeError, match="before the expert weights were loaded"):
        fresh(_x())


def test_assigned_wrong_shape_is_named():
    # an assignment of the wrong shape is refused at the assignment, naming the tensor and the shapes
    fresh = moekit.FusedMoE(E, K, H, I, params_dtype=torch.float32, gate=torch.nn.Linear(H, E, bias=False))
    with pytest.raises((ValueError, RuntimeError), match=r"w13_weight"):
        fresh.routed_experts.w13_weight = _hf(torch.zeros(E, 2 * I, H + 1))


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
    tensors = {n: t.detach().clone() for n, t in src.routed_experts.expert_tensors().items()}
    tensors["w2_scale"][3] = 127 + 20  # 2^20 · 6 > 65504
    fresh.routed_experts.w2_weight = _hf(tensors["w2_weight"])
    with pytest.raises(ValueError, match="float16"):
        fresh.routed_experts.w2_scale = _hf(tensors["w2_scale"])
