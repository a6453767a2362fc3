"""Round 55's new-user trial: layers with a shared MLP pickle, a latent layer says its input width, and a user
module that does not fit its input (width, dtype) raises naming the module instead of torch's matmul error."""

import copy
import io
import pickle

import pytest
import torch

import moekit
from moekit.loading.modules import RouterLinear, SharedMLP
from moekit.ops.activation import ACTIVATIONS, get_activation

E, K, H, I, HL = 4, 2, 16, 8, 12


def _loaded(layer):
    g = torch.Generator().manual_seed(0)
    re = layer.routed_experts
    layer.load_expert_weights(torch.randn(re.w13_weight.shape, generator=g) * 0.1,
                              torch.randn(re.w2_weight.shape, generator=g) * 0.1)
    return layer.eval()


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_activation_records_pickle_to_the_registrys_own(act):
    # every registry entry (lambdas inside) pickles by name and comes back as the same record
    a = get_activation(act)
    assert pickle.loads(pickle.dumps(a)) is a and copy.deepcopy(a) is a


def test_a_layer_with_a_shared_mlp_saves_and_loads_whole():
    # torch.save(layer) raised PicklingError (SharedMLP holds its Activation record); now the copy computes the bits
    layer = _loaded(moekit.FusedMoE(E, K, H, I, params_dtype=torch.float32, backend="torch",
                                    shared_experts=SharedMLP(H, I, activation="gelu")))
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    x, lg = torch.randn(3, H), torch.randn(3, E)
    assert torch.equal(back(x, lg), layer(x, lg)) and back.shared_experts.act is get_activation("gelu")


def _latent(**kw):
    # a latent MoE: the experts run at HL, the block's input and output are H wide
    return _loaded(moekit.FusedMoE(E, K, HL, I, params_dtype=torch.float32, backend="torch",
                                   routed_input_transform=torch.nn.Linear(H, HL, bias=False),
                                   routed_output_transform=torch.nn.Linear(HL, H, bias=False), **kw))


def test_input_size_is_the_width_the_layer_takes():
    # plain: hidden_size; latent: the transform's in_features (moe_config.hidden_size is the latent width)
    assert moekit.FusedMoE(E, K, H, I).input_size == H
    layer = _latent()
    assert layer.moe_config.hidden_size == HL and layer.input_size == H
    seq = torch.nn.Sequential(torch.nn.Linear(H, HL), torch.nn.LayerNorm(HL))  # the first Linear's in_features
    assert moekit.FusedMoE(E, K, HL, I, routed_input_transform=seq).input_size == H
    assert layer(torch.randn(2, layer.input_size), torch.randn(2, E)).shape == (2, H)


def test_a_latent_layer_fed_the_latent_width_names_the_transform():
    # the docs' old snippet fed moe_config.hidden_size: torch's "mat1 and mat2 shapes cannot be multiplied"
    with pytest.raises(ValueError, match=r"routed_input_transform takes inputs of width 16 .* got \[5, 12\]"):
        _latent()(torch.randn(5, HL), torch.randn(5, E))


def test_a_gate_of_another_dtype_names_the_gate():
    # README's "prefer bfloat16" with an fp32 nn.Linear gate left as built: TypeError naming the gate and the fix
    layer = _loaded(moekit.FusedMoE(E, K, H, I, params_dtype=torch.bfloat16, backend="torch",
                                    gate=torch.nn.Linear(H, E, bias=False)))
    with pytest.raises(TypeError, match=r"gate has torch.float32 weights but gets torch.bfloat16 inputs"):
        layer(torch.randn(3, H, dtype=torch.bfloat16))
    layer.to(torch.bfloat16)  # the fix the message names
    assert layer(torch.randn(3, H, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_a_float32_router_gate_of_another_dtype_is_fine():
    # RouterLinear(fp32=True) computes in float32 whatever its weights: no error to raise
    layer = _loaded(moekit.FusedMoE(E, K, H, I, params_dtype=torch.bfloat16, backend="torch",
                                    gate=RouterLinear(H, E, fp32=True)))
    assert layer(torch.randn(3, H, dtype=torch.bfloat16)).shape == (3, H)


def test_shared_experts_of_another_dtype_name_themselves():
    layer = _loaded(moekit.FusedMoE(E, K, H, I, params_dtype=torch.bfloat16, backend="torch",
                                    shared_experts=SharedMLP(H, I)))
    with pytest.raises(TypeError, match="shared_experts has torch.float32 weights"):
        layer(torch.randn(3, H, dtype=torch.bfloat16), torch.randn(3, E))


def test_other_errors_of_a_user_module_pass_through():
    # a RuntimeError that is no width / dtype mismatch is the module's own: re-raised unchanged
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("my module's own failure")

    layer = _loaded(moekit.FusedMoE(E, K, H, I, params_dtype=torch.float32, backend="torch", shared_experts=Broken()))
    with pytest.raises(RuntimeError, match="my module's own failure"):
        layer(torch.randn(3, H), torch.randn(3, E))


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory"), RuntimeError("a CUDA error")])
def test_an_unrelated_error_of_a_module_whose_first_linear_differs_passes_through(error):
    # the review's case: an fp32 shared MLP in a bf16 layer (autocast setups) or a down Linear registered first; an
    # out-of-memory or other error inside it stays itself, not a "weights of another dtype" TypeError
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.down = torch.nn.Linear(I, H, bias=False)  # registered first, in_features != H, float32

        def forward(self, x):
            raise error

    layer = _loaded(moekit.FusedMoE(E, K, H, I, params_dtype=torch.bfloat16, backend="torch", shared_experts=Shared()))
    with pytest.raises(type(error)) as got:
        layer(torch.randn(3, H, dtype=torch.bfloat16), torch.randn(3, E))
    assert got.value is error
