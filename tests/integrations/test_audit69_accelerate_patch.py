"""Round 69's audit of moekit with Hugging Face accelerate (big-model inference with offloading): the experts switch's
converted stacks do not outlive offloaded weights, the blocks patch() keeps for unpatch() do not pin offloaded
weights, patch() of an offloaded model says what to do, accelerate's hooks on a replaced block. Tiny random
transformers models (fp32, CPU)."""

from __future__ import annotations

import copy
import gc
import os
import pickle
import sys
import warnings
import weakref

import pytest
import torch

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")
sys.path.insert(0, os.path.dirname(__file__))
import hf_tiny  # noqa: E402
import hf_tiny13  # noqa: E402
from accelerate.hooks import AlignDevicesHook, ModelHook, add_hook_to_module  # noqa: E402
from accelerate.hooks import remove_hook_from_submodules  # noqa: E402

from moekit.integrations.transformers import MoEBlockAdapter, patch, register, unpatch  # noqa: E402

IDS = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(0))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _close(out, ref):
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def _converted(model) -> list[bool]:
    """Per experts module of a switch model: whether it holds converted stacks (the switch's cache)."""
    return [vars(m).get("_moekit_converted") is not None for m in model.modules() if hasattr(m, "gate_up_proj")]


def _disk_map(model, offloaded: str = "model.layers") -> dict:
    """A device_map putting ``offloaded`` on disk and every other top-level part of ``model.model`` on the CPU."""
    dm = {f"model.{n}": "cpu" for n, _ in model.model.named_children()}
    dm.update({offloaded: "disk", "lm_head": "cpu"})
    return dm


def _switch_gpt_oss():
    warnings.filterwarnings("ignore")
    register()
    model = hf_tiny.build("gpt_oss")
    model.set_experts_implementation("moekit")
    return model


# --- A: the experts switch's conversion cache -----------------------------------------------------------------------


def test_switch_loaded_with_disk_offload_keeps_no_converted_copies(tmp_path):
    # edge: from_pretrained(experts_implementation="moekit", device_map with "disk") on gpt-oss (converted stacks):
    # accelerate loads new tensors per forward; the cache held them and their copies, every offloaded layer's
    # experts stayed in memory twice after a forward
    register()
    src = hf_tiny.build("gpt_oss")
    ref = _logits(src)
    src.save_pretrained(tmp_path / "ckpt")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ckpt", dtype=torch.float32, experts_implementation="moekit", device_map=_disk_map(src),
        offload_folder=str(tmp_path / "off")).eval()
    assert model.model.layers[0].mlp.experts.gate_up_proj.device.type == "meta"  # (offloaded)
    for _ in range(2):
        _close(_logits(model), ref)
        assert _converted(model) == [False, False]


def test_switch_under_cpu_offload_keeps_no_converted_copies():
    # edge: accelerate.cpu_offload (weights kept in a CPU map, new parameter objects per forward): the cache pinned
    # each forward's converted copies (a second copy of every layer's experts)
    model = _switch_gpt_oss()
    ref = _logits(hf_tiny.build("gpt_oss"))
    accelerate.cpu_offload(model, execution_device="cpu")
    _close(_logits(model), ref)
    assert _converted(model) == [False, False]


def test_switch_cache_does_not_keep_a_replaced_stack_alive():
    # edge: the cache's key held its source tensors strongly: a replaced stack stayed in memory (with the copies made
    # from it) until the next forward; now it is freed and the cache dropped with it, and the next call converts anew
    model = _switch_gpt_oss()
    ex = model.model.layers[0].mlp.experts
    _logits(model)
    assert _converted(model) == [True, True]
    old = weakref.ref(ex.down_proj)
    with torch.no_grad():
        ex.down_proj = torch.nn.Parameter(ex.down_proj * 2.0)
    gc.collect()
    assert old() is None and _converted(model) == [False, True]
    ref = hf_tiny.build("gpt_oss")
    with torch.no_grad():
        ref.model.layers[0].mlp.experts.down_proj.mul_(2.0)
    _close(_logits(model), _logits(ref))
    assert _converted(model) == [True, True]


def test_switch_cache_stays_while_its_sources_live_and_is_not_copied():
    # edge: a pickle or deep copy of the model carried the converted copies (more bytes; now their weak key cannot be
    # pickled, and a copy would key them on the original's tensors): the copy converts its own. Control: without
    # offloading the copies are made once (the same cache on the next call)
    model = _switch_gpt_oss()
    ex = model.model.layers[0].mlp.experts
    ref = _logits(model)
    first = ex._moekit_converted
    _logits(model)
    assert ex._moekit_converted is first
    for twin in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert _converted(twin) == [False, False]
        assert torch.equal(_logits(twin), ref) and _converted(twin) == [True, True]


# --- B: the blocks patch() keeps for unpatch() ----------------------------------------------------------------------


def _layer_tensors(model, names) -> list[weakref.ref]:
    """Weak references to the patched layers' parameters (the replaced blocks' own objects, shared)."""
    return [weakref.ref(p) for n in names for p in model.get_submodule(n).moe.parameters()]


def test_patch_then_disk_offload_frees_the_shared_weights(tmp_path):
    # edge: patch() then accelerate.disk_offload: accelerate puts meta parameters in the moekit layers, but the blocks
    # patch() kept for unpatch() held the old ones: no memory was freed. Now they are held by weak reference: freed;
    # unpatch() then refuses (the weights are on disk, not in the blocks), naming the offloading
    model = hf_tiny.build("mixtral")
    ref = _logits(model)
    names = patch(model)
    refs = _layer_tensors(model, names)
    with pytest.warns(UserWarning, match="state_dict"):  # (disk_offload saves the state_dict)
        accelerate.disk_offload(model, str(tmp_path), execution_device="cpu", preload_module_classes=["MoERunner"])
    gc.collect()
    assert refs and all(r() is None for r in refs)
    _close(_logits(model), ref)
    with pytest.raises(ValueError, match="no longer share .*accelerate's offloading") as err:
        unpatch(model)
    assert names[0] in str(err.value) and "load the model again" in str(err.value)
    assert all(isinstance(model.get_submodule(n), MoEBlockAdapter) for n in names)  # nothing was changed


def test_patch_then_cpu_offload_refused_by_unpatch_naming_it():
    # edge: patch() then accelerate.cpu_offload: the kept blocks held the replaced parameter objects (the offload map
    # holds the same bytes: no second copy, but unpatch()'s refusal named only replaced weights); now they are
    # freed and the refusal names accelerate's offloading
    model = hf_tiny.build("qwen3_moe")
    names = patch(model)
    refs = _layer_tensors(model, names)
    with pytest.warns(UserWarning, match="state_dict"):
        accelerate.cpu_offload(model, execution_device="cpu", preload_module_classes=["MoERunner"])
    gc.collect()
    assert all(r() is None for r in refs)
    with pytest.raises(ValueError, match="cpu_offload / disk_offload / dispatch_model"):
        unpatch(model)


def test_layer_level_moe_then_disk_offload_frees_the_shared_weights(tmp_path):
    # edge: the same for a layer-level MoE (Gemma 4: the decoder layer's router / experts / norms kept as
    # {member: module}): the kept members held the layer's weights
    model = hf_tiny13.build("gemma4")
    if model is None:
        pytest.skip(f"transformers {transformers.__version__} has no Gemma 4")
    names = patch(model)
    refs = [weakref.ref(p) for m in model.modules() if hasattr(m, "moe") for p in m.moe.parameters()]
    with pytest.warns(UserWarning, match="state_dict"):
        accelerate.disk_offload(model, str(tmp_path), execution_device="cpu", preload_module_classes=["MoERunner"])
    gc.collect()
    assert names and refs and all(r() is None for r in refs)
    with pytest.raises(ValueError, match="no longer share"):
        unpatch(model)


def test_weights_replaced_after_patch_are_freed():
    # edge: load_state_dict(assign=True) on a patched model: the kept blocks kept the old weights in memory until
    # unpatch() (which refuses them); now only the new ones stay
    model = hf_tiny.build("mixtral")
    names = patch(model)
    refs = _layer_tensors(model, names)
    with pytest.warns(UserWarning, match="unpatch"):
        state = model.state_dict()
    model.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
    del state
    gc.collect()
    assert all(r() is None for r in refs)
    with pytest.raises(ValueError, match="no longer share"):
        unpatch(model)


def test_a_replaced_block_reads_and_runs_as_before_while_patched():
    # control: the weakly held tensors read as the block's own (the same objects): a replaced block one still holds
    # computes what the patched one does, and unpatch() puts back the very same parameter objects
    model = hf_tiny.build("mixtral")
    block = model.model.layers[0].mlp
    before = {n: id(p) for n, p in block.named_parameters()}
    patch(model)
    adapter = model.model.layers[0].mlp
    assert {n: id(p) for n, p in block.named_parameters()} == before
    assert block.experts.gate_up_proj is adapter.moe.routed_experts.w13_weight
    x = torch.randn(2, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(adapter(x), block(x), rtol=1e-5, atol=1e-5)
    unpatch(model)
    assert model.model.layers[0].mlp is block and {n: id(p) for n, p in block.named_parameters()} == before
    assert type(block.experts._parameters) is dict  # (plain again)


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_a_copy_of_a_patched_model_unpatches_with_its_own_tensors(how):
    # control: the weak references of a pickled / copied model point to the copy's tensors (the copied layer's)
    model = hf_tiny.build("mixtral")
    ref = _logits(model)
    names = patch(model)
    twin = pickle.loads(pickle.dumps(model)) if how == "pickle" else copy.deepcopy(model)
    shared = twin.get_submodule(names[0]).moe.routed_experts.w13_weight
    assert unpatch(twin) == names
    assert twin.get_submodule(names[0]).experts.gate_up_proj is shared
    assert torch.equal(_logits(twin), ref)
    assert all(isinstance(model.get_submodule(n), MoEBlockAdapter) for n in names)  # the original stays patched


# --- C: patch() of an offloaded model -------------------------------------------------------------------------------


def test_patch_of_an_offloaded_model_says_what_to_do(tmp_path):
    # edge: the refusal said only that patch() needs the block's weights in memory; now it names the ways that work
    src = hf_tiny.build("mixtral")
    src.save_pretrained(tmp_path / "ckpt")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ckpt", dtype=torch.float32, device_map=_disk_map(src), offload_folder=str(tmp_path / "off"))
    with pytest.raises(ValueError, match="on the meta device") as err:
        patch(model)
    for hint in ("device_map", "max_memory", "accelerate.cpu_offload", "register()", "experts_implementation='moekit'",
                 "nothing was changed"):
        assert hint in str(err.value), hint
    assert not any(isinstance(m, MoEBlockAdapter) for m in model.modules())


# --- accelerate's hooks on a replaced block -------------------------------------------------------------------------


def _dispatched(tmp_path):
    """A tiny Mixtral dispatched by accelerate (lm_head on disk): every module holding tensors, the MoE blocks too, gets
    an AlignDevicesHook (no offload) moving its inputs to its device."""
    model = hf_tiny.build("mixtral")
    ref = _logits(model)
    dm = {f"model.{n}": "cpu" for n, _ in model.model.named_children()}
    dm["lm_head"] = "disk"
    accelerate.dispatch_model(model, device_map=dm, offload_dir=str(tmp_path))
    return model, ref


def test_patch_moves_a_blocks_device_hook_to_its_replacement(tmp_path):
    # edge: patch() of a dispatched model dropped the accelerate hook of each block (accelerate wraps forward and
    # stores the hook in _hf_hook, which warn_user_hooks did not look at): on several devices the block's inputs were
    # no longer moved to its device. Now the device hook runs on the replacement; the hooks inside the block (they
    # repeat the block's) are not warned about
    model, ref = _dispatched(tmp_path)
    blocks = {n: m for n, m in model.named_modules() if n.endswith(".mlp")}
    hooks = {n: b._hf_hook for n, b in blocks.items()}
    assert all(type(h) is AlignDevicesHook and not h.offload for h in hooks.values())
    calls = []
    for n, h in hooks.items():
        h.pre_forward = lambda module, *a, _pre=h.pre_forward, _n=n, **k: (calls.append(_n), _pre(module, *a, **k))[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no "do not run while the block is patched" warning)
        names = patch(model)
    assert names == list(blocks)
    for n in names:
        assert model.get_submodule(n)._hf_hook is hooks[n]
    calls.clear()
    _close(_logits(model), ref)
    assert calls == names


def test_unpatch_hands_the_device_hook_back(tmp_path):
    # edge: hooks removed while patched (accelerate's remove_hook_from_submodules reaches the replacements only) came
    # back on the blocks with unpatch(); now a block gets its replacement's device hook of then (none here)
    model, ref = _dispatched(tmp_path)
    blocks = {n: m for n, m in model.named_modules() if n.endswith(".mlp")}
    hooks = {n: b._hf_hook for n, b in blocks.items()}
    names = patch(model)
    unpatch(model)  # (kept: the same hook objects)
    assert all(model.get_submodule(n)._hf_hook is hooks[n] for n in names)
    patch(model)
    remove_hook_from_submodules(model)
    unpatch(model)
    for n in names:
        assert model.get_submodule(n) is blocks[n]
        assert not hasattr(blocks[n], "_hf_hook")
        assert "forward" not in vars(blocks[n]) or not hasattr(vars(blocks[n])["forward"], "func")  # (not wrapped)
    assert torch.equal(_logits(model), ref)


def test_layer_level_moe_members_device_hooks_move_and_come_back(tmp_path):
    # edge: the same for a layer-level MoE (Gemma 4): each replaced member of the decoder layer (experts, router,
    # norms) hands its device hook to its stand-in, and gets its stand-in's back (none here: removed while patched)
    model = hf_tiny13.build("gemma4")
    if model is None:
        pytest.skip(f"transformers {transformers.__version__} has no Gemma 4")
    ref = _logits(model)
    dm = {f"model.{n}": "cpu" for n, _ in model.model.named_children()}
    dm["lm_head"] = "disk"
    accelerate.dispatch_model(model, device_map=dm, offload_dir=str(tmp_path))
    layer = model.model.layers[0]
    members = {n: getattr(layer, n) for n in ("experts", "router")}
    hooks = {n: m._hf_hook for n, m in members.items()}
    patch(model)
    assert all(getattr(layer, n)._hf_hook is h for n, h in hooks.items())
    _close(_logits(model), ref)
    remove_hook_from_submodules(model)
    unpatch(model)
    for n, m in members.items():
        assert getattr(layer, n) is m and not hasattr(m, "_hf_hook"), n
    assert torch.equal(_logits(model), ref)


class _Scale(ModelHook):
    """An accelerate hook of one's own: it doubles the block's output."""

    def post_forward(self, module, output):
        return output * 2.0


def test_other_accelerate_hooks_on_a_block_are_named():
    # edge: an accelerate hook that is not a device hook (one's own, CpuOffload) stopped running silently once the
    # block was replaced; now patch() names it as it names torch's forward hooks, and unpatch() brings it back
    model = hf_tiny.build("mixtral")
    block = model.model.layers[1].mlp
    hook = _Scale()
    add_hook_to_module(block, hook)
    hooked = _logits(model)
    with pytest.warns(UserWarning, match=r"model\.layers\.1\.mlp \(accelerate _Scale\).*do not run"):
        patch(model)
    assert not hasattr(model.model.layers[1].mlp, "_hf_hook")
    unpatch(model)
    assert model.model.layers[1].mlp is block and block._hf_hook is hook
    assert torch.equal(_logits(model), hooked)
