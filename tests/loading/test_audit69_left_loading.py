"""Round 69: checkpoint folders round 68 left. ``moekit inspect`` of a sharded checkpoint whose index names shard files
that are not on disk (an interrupted download) said nothing of them; one tensor of a layer's own (a router weight, a
selection bias, a shared expert's weight) stored under two names loaded whichever was read last. Each case names its
edge."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import moekit
from moekit.cli import main
from moekit.loading.files import CheckpointNotFoundError
from moekit.loading.inspect import inspect_main
from ckpt_blocks import qwen3_block

H, I, E, K = 16, 8, 4, 2
PRE = "model.layers.0.mlp."
QWEN3 = dict(model_type="qwen3_moe", hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K,
             num_hidden_layers=1, norm_topk_prob=True, dtype="float32", hidden_act="silu")


def _sharded(path, tensors, shards, keep, config=None):
    """config.json, ``shards`` files and their index; only the shards in ``keep`` written (a partial download)."""
    os.makedirs(path, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or QWEN3))
    keys, weight_map = sorted(tensors), {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[s::shards]}
        if s in keep:
            save_file(part, str(path / name))
        weight_map.update(dict.fromkeys(part, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return str(path)


# --- 1. inspect of an index naming shard files not on disk

def test_inspect_names_the_missing_shard_and_exits_1(tmp_path, capsys):
    # edge: shard 2 of 3 (holding expert tensors) missing: inspect read the other two and printed the table as if
    # complete, exit 0, while load_moe_layers refuses the folder naming the file. The table still shows (the layout
    # is config.json's), the missing file is named on stderr, exit 1
    path = _sharded(tmp_path / "ckpt", qwen3_block(PRE, E, H, I), 3, keep=(0, 2))
    assert inspect_main([path]) == 1
    out, err = capsys.readouterr()
    assert "Qwen3-MoE" in out and "routed expert weights" in out
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in ("moekit inspect: warning: 1 of the 3 shard files model.safetensors.index.json names is not in",
                   "model-00002-of-00003.safetensors;", "load_moe_layers would refuse this checkpoint",
                   "an interrupted download?"):
        assert needle in err, (needle, err)
    with pytest.raises(CheckpointNotFoundError, match=r"model-00002-of-00003\.safetensors .*does not exist"):
        moekit.load_moe_layers(path, progress=False)
    assert main(["inspect", path]) == 1  # (the moekit command: the same exit status)
    capsys.readouterr()


def test_inspect_names_broken_symlinks_and_counts_the_rest(tmp_path, capsys):
    # edge: a hub snapshot whose shards are broken symlinks (blobs not downloaded) beside present ones: each named as
    # one, the list cut after four
    t = qwen3_block(PRE, E, H, I)
    path = _sharded(tmp_path / "ckpt", t, 7, keep=(0, 6))
    for s in (1, 2):
        os.symlink(tmp_path / "blobs" / f"gone{s}", tmp_path / "ckpt" / f"model-0000{s + 1}-of-00007.safetensors")
    assert inspect_main([path]) == 1
    err = capsys.readouterr().err
    assert "5 of the 7 shard files model.safetensors.index.json names are not in" in err
    assert "model-00002-of-00007.safetensors (a broken symlink), model-00003-of-00007.safetensors (a broken symlink), "\
           "model-00004-of-00007.safetensors, model-00005-of-00007.safetensors and 1 more;" in err, err


def test_a_missing_shard_of_no_moe_tensor_is_a_warning_only(tmp_path, capsys):
    # edge: the missing shard holds the attention weights only (load_moe_layers reads none of them and loads the
    # folder): inspect says the checkpoint is incomplete, exit 0
    t = qwen3_block(PRE, E, H, I)
    path = _sharded(tmp_path / "ckpt", t, 1, keep=(0,))
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.self_attn.q_proj.weight"] = "model-00002-of-00002.safetensors"
    (tmp_path / "ckpt" / "model.safetensors.index.json").write_text(json.dumps(index))
    assert inspect_main([path]) == 0
    err = capsys.readouterr().err
    assert "1 of the 2 shard files" in err and "it holds no MoE block tensor" in err and "incomplete" in err, err
    assert list(moekit.load_moe_layers(path, progress=False)) == [PRE[:-1]]


def test_an_index_alone_is_a_note_and_exit_0(tmp_path, capsys):
    # edge: config.json and the index downloaded alone, to see the layout before the weights (round 56's case, kept at
    # exit 0 with the table at config.json's dtype): nothing said the shard files were not there; now a note does
    path = _sharded(tmp_path / "ckpt", qwen3_block(PRE, E, H, I), 2, keep=())
    assert inspect_main([path]) == 0
    out, err = capsys.readouterr()
    assert "no .safetensors header read" in out
    assert err.startswith("moekit inspect: note: none of the 2 shard files model.safetensors.index.json names is in")


def test_a_complete_sharded_checkpoint_says_nothing_more(tmp_path, capsys):
    # guard: every shard there: no line on stderr
    path = _sharded(tmp_path / "ckpt", qwen3_block(PRE, E, H, I), 3, keep=(0, 1, 2))
    assert inspect_main([path]) == 0
    assert capsys.readouterr().err == ""


# --- 2. one tensor of the layer's own under two names

def _write(path, tensors, config=None):
    os.makedirs(path, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or QWEN3))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return str(path)


DS3 = dict(model_type="deepseek_v3", hidden_size=H, moe_intermediate_size=I, n_routed_experts=6, num_experts_per_tok=2,
           n_group=3, topk_group=2, n_shared_experts=1, num_hidden_layers=2, first_k_dense_replace=1, dtype="float32")
DS_PRE = "model.layers.1.mlp."


def _ds3_block(seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {DS_PRE + "gate.weight": torch.randn(6, H, generator=g),
         DS_PRE + "gate.e_score_correction_bias": torch.rand(6, generator=g)}
    shapes = (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I)))
    for x in range(6):
        t.update({DS_PRE + f"experts.{x}.{n}.weight": torch.randn(*s, generator=g) for n, s in shapes})
    t.update({DS_PRE + f"shared_experts.{n}.weight": torch.randn(*s, generator=g) for n, s in shapes})
    return t


# (config, block, the original key, its second name: a moekit-patched model's state dict holds the block's tensors
# again under the adapter's ``moe.`` module)
SECOND_NAMES = [
    pytest.param(QWEN3, lambda: qwen3_block(PRE, E, H, I), PRE + "gate.weight", PRE + "moe.gate.weight", id="router"),
    pytest.param(DS3, _ds3_block, DS_PRE + "gate.e_score_correction_bias",
                 DS_PRE + "moe.router.e_score_correction_bias", id="selection_bias"),
    pytest.param(DS3, _ds3_block, DS_PRE + "shared_experts.up_proj.weight",
                 DS_PRE + "moe.shared_experts.up_proj.weight", id="shared_expert"),
]


@pytest.mark.parametrize("config, block, key, second", SECOND_NAMES)
def test_a_tensor_of_the_layer_under_two_names_that_differ_is_refused(tmp_path, capsys, config, block, key, second):
    # edge: the router weight, the selection bias (taken at construction, then overwritten by the second name) or a
    # shared expert's weight under a second name holding other values: one of the two loaded, silently (round 68
    # refused this for routed-expert tensors only). Refused naming both keys, by load_moe_layers and inspect
    t = block()
    t[second] = torch.zeros_like(t[key])
    path = _write(tmp_path / "ckpt", t, config)
    name = second.removeprefix(DS_PRE if config is DS3 else PRE).removeprefix("moe.")
    want = (rf"mlp: {name} is stored twice in the checkpoint, as '.*' and as '.*', and the two copies differ: remove "
            r"one \(moekit does not guess which copy is current; bit-identical copies load\)")
    with pytest.raises(ValueError, match=want) as err:
        moekit.load_moe_layers(path, progress=False)
    assert repr(key) in str(err.value) and repr(second) in str(err.value)
    assert inspect_main([path]) == 1
    assert "is stored twice" in capsys.readouterr().err


@pytest.mark.parametrize("config, block, key, second", SECOND_NAMES)
def test_bit_identical_copies_under_two_names_load(tmp_path, capsys, config, block, key, second):
    # guard: the same tensor saved under both names (a save that kept a renamed copy beside the original): either
    # gives the layer the same tensor; it loads as the folder without the copy loads, and inspect shows it
    t = block()
    t[second] = t[key].clone()
    path = _write(tmp_path / "ckpt", t, config)
    layers = moekit.load_moe_layers(path, progress=False)
    plain = moekit.load_moe_layers(_write(tmp_path / "plain", {k: v for k, v in t.items() if k != second}, config),
                                   progress=False)
    for name, layer in layers.items():
        mine, theirs = layer.state_dict(), plain[name].state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert inspect_main([path]) == 0
    capsys.readouterr()


def test_a_value_that_differs_in_its_bits_only_is_refused(tmp_path):
    # edge: "identical" is bit-identical: -0.0 for 0.0, or the same values in another dtype, are other copies
    t = qwen3_block(PRE, E, H, I)
    t[PRE + "gate.weight"][0, 0] = 0.0
    t[PRE + "moe.gate.weight"] = t[PRE + "gate.weight"].clone()
    t[PRE + "moe.gate.weight"][0, 0] = -0.0
    with pytest.raises(ValueError, match="the two copies differ"):
        moekit.load_moe_layers(_write(tmp_path / "a", t), progress=False)
    t[PRE + "moe.gate.weight"] = t[PRE + "gate.weight"].double()
    with pytest.raises(ValueError, match="the two copies differ"):
        moekit.load_moe_layers(_write(tmp_path / "b", t), progress=False)


def _minimax_saved(tmp_path):
    """MiniMax-M3-VL saved by transformers (its shared MLP's gate_proj / up_proj apart, which moekit's layer holds
    fused as gate_up_proj), as round 63's test builds it; (folder, tensors, the block's key prefix)."""
    pytest.importorskip("transformers")
    from test_wrapper_saves63 import _build

    model = _build("minimax_m3_vl")
    model.save_pretrained(tmp_path)
    return tmp_path, load_file(str(tmp_path / "model.safetensors")), "language_model.model.layers.0.block_sparse_moe."


def test_a_fused_shared_stack_beside_its_halves(tmp_path):
    # edge: the fused shared gate_up_proj (the layout in memory) saved beside the two halves (the Hub's): each half
    # wrote its rows and the fused one all of them, the last read kept. Its up rows differing: refused naming them;
    # a bit-identical fused copy loads
    path, t, pre = _minimax_saved(tmp_path)
    fused = torch.cat([t[pre + "shared_experts.gate_proj.weight"], t[pre + "shared_experts.up_proj.weight"]])
    t[pre + "shared_experts.gate_up_proj.weight"] = fused.clone()
    save_file(t, str(path / "model.safetensors"))
    layer = moekit.load_moe_layers(path, progress=False)["model.language_model.layers.0.mlp"]
    assert torch.equal(layer.shared_experts.gate_up_proj.weight, fused)
    fused[-1, 0] += 1.0
    t[pre + "shared_experts.gate_up_proj.weight"] = fused
    save_file(t, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"shared_experts\.gate_up_proj\.weight \(up_proj rows\) is stored twice in "
                                         r"the checkpoint, as '\S+shared_experts\.gate_up_proj\.weight' and as "
                                         r"'\S+shared_experts\.up_proj\.weight', and the two copies differ"):
        moekit.load_moe_layers(path, progress=False)
