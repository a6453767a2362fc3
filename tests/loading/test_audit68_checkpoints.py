"""Round 68's checkpoint-loading audit: folders laid out as real downloads and saves leave them (one expert tensor under
two names, a one-file save beside an older index, Git LFS pointers, hub ids and hub cache folders, AWQ / bitsandbytes
configs, broken symlinks, a bytes path, a header whose shape disagrees with its bytes). Each case names its edge."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

import moekit
from moekit.loading.files import CheckpointNotFoundError
from moekit.loading.inspect import inspect_main
from ckpt_blocks import qwen3_block
from test_audit53_cli import _one_line  # one stderr line naming the needles, no traceback

H, I, E, K = 16, 8, 4, 2
PRE = "model.layers.0.mlp."


def _qwen3(**kw):
    return dict(model_type="qwen3_moe", hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K,
                num_hidden_layers=1, norm_topk_prob=True, dtype="float32", hidden_act="silu", **kw)


def _block(seed=0, prefix=PRE):
    return qwen3_block(prefix, E, H, I, seed)


def _write(path, tensors, config=None, name="model.safetensors"):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config or _qwen3(), f)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, name))
    return str(path)


def _stacks(t):
    gu = torch.stack([torch.cat([t[PRE + f"experts.{x}.gate_proj.weight"], t[PRE + f"experts.{x}.up_proj.weight"]])
                      for x in range(E)])
    return gu, torch.stack([t[PRE + f"experts.{x}.down_proj.weight"] for x in range(E)])


def _w13(layers, x=0):
    return layers[PRE[:-1]].routed_experts.w13_weight[x]


# --- 1. one expert tensor under two checkpoint names

@pytest.mark.parametrize("extra", [
    # edge: expert 2's gate stored as gate_proj and as Mixtral's w1 (zeros): the one read last won, silently
    lambda t: {PRE + "experts.2.w1.weight": torch.zeros(I, H)},
    # edge: every per-expert key and the fused stacks of the same experts (zeros)
    lambda t: {PRE + "experts.gate_up_proj": torch.zeros_like(_stacks(t)[0]),
               PRE + "experts.down_proj": torch.zeros_like(_stacks(t)[1])},
    # edge: a fused down stack beside the per-expert down keys only
    lambda t: {PRE + "experts.down_proj": torch.zeros_like(_stacks(t)[1])},
])
def test_an_expert_tensor_under_two_names_is_refused(tmp_path, extra, capsys):
    t = _block()
    path = _write(tmp_path, {**t, **extra(t)})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp: expert \d's w[123] .*stored twice.*"
                                         r"experts\.\S+' and as '\S+experts\.\S+.*remove one"):
        moekit.load_moe_layers(path, progress=False)
    assert inspect_main([path]) == 1  # edge: inspect refuses what load_moe_layers refuses
    _one_line(capsys, "stored twice")


def test_the_same_name_under_two_prefixes_is_refused(tmp_path):
    # edge: two of the block's key prefixes ("model.layers.0.mlp." and a bare "layers.0.mlp.", two exports in one
    # file) hold one tensor: two keys, one name, the one listed last loaded
    t = _block()
    bare = {k.removeprefix("model."): torch.zeros_like(v) for k, v in t.items() if ".experts.1.up_proj" in k}
    path = _write(tmp_path, {**t, **bare})
    with pytest.raises(ValueError, match=r"experts\.1\.up_proj\.weight.*both load as.*remove one"):
        moekit.load_moe_layers(path, progress=False)


def test_disjoint_parts_under_several_names_still_load(tmp_path):
    # edge: per-expert gate/up keys with the down projection as one fused stack (another shard), and expert 3's gate
    # as Mixtral's w1 while the others say gate_proj: every expert tensor written once
    t = _block()
    _, down = _stacks(t)
    mixed = {k: v for k, v in t.items() if "down_proj" not in k}
    mixed[PRE + "experts.down_proj"] = down
    mixed[PRE + "experts.3.w1.weight"] = mixed.pop(PRE + "experts.3.gate_proj.weight")
    layers = moekit.load_moe_layers(_write(tmp_path, mixed), progress=False)
    torch.testing.assert_close(_w13(layers, 3)[:I], t[PRE + "experts.3.gate_proj.weight"])
    torch.testing.assert_close(layers[PRE[:-1]].routed_experts.w2_weight[1], t[PRE + "experts.1.down_proj.weight"])


# --- 2. model.safetensors beside model.safetensors.index.json

def test_a_single_file_beside_an_index_is_read_as_transformers_reads_it(tmp_path, capsys):
    # edge: a one-file save (seed 1) into a folder holding an older sharded save (seed 0) and its index: transformers
    # reads model.safetensors (SAFE_WEIGHTS_NAME before the index); moekit followed the index
    old, new = _block(0), _block(1)
    path = _write(tmp_path, {k: v for k, v in old.items() if "down" in k}, name="model-00001-of-00002.safetensors")
    save_file({k: v for k, v in old.items() if "down" not in k}, os.path.join(path, "model-00002-of-00002.safetensors"))
    index = {k: f"model-0000{1 if 'down' in k else 2}-of-00002.safetensors" for k in old}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    save_file(new, os.path.join(path, "model.safetensors"))
    layers = moekit.load_moe_layers(path, progress=False)
    torch.testing.assert_close(_w13(layers)[:I], new[PRE + "experts.0.gate_proj.weight"])
    # edge: inspect reads the same file (its index names a shard that is now damaged: not read)
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"\x07" * 64)
    assert inspect_main([path]) == 0
    capsys.readouterr()


# --- 3. Git LFS pointers and empty files

_POINTER = ("version https://git-lfs.github.com/spec/v1\n"
            "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 4983207120\n")


@pytest.mark.parametrize("content, needles", [
    (_POINTER.encode(), ("Git LFS pointer", "git lfs pull", "snapshot_download")),  # edge: a clone without git-lfs
    (b"", ("is empty (0 bytes)",)),  # edge: a 0-byte file ("unpack requires a buffer of 8 bytes" before)
])
def test_a_pointer_or_empty_shard_says_what_it_is(tmp_path, content, needles, capsys):
    path = _write(tmp_path, _block())
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(ValueError) as err:
        moekit.load_moe_layers(path, progress=False)
    assert "model.safetensors" in str(err.value) and all(n in str(err.value) for n in needles), err.value
    assert inspect_main([path]) == 1
    _one_line(capsys, *needles)


# --- 4. hub repo ids, hub cache folders, ~ paths

def _hub_cache(tmp_path, rev="abc123"):
    src = _write(tmp_path / "plain", _block())
    root = tmp_path / "hub" / "models--org--tiny"
    snap = root / "snapshots" / rev
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(rev)
    for name in os.listdir(src):
        os.symlink(os.path.join(src, name), snap / name)
    return str(root), str(snap)


def test_a_hub_repo_id_says_moekit_reads_local_folders(tmp_path, monkeypatch, capsys):
    # edge: what from_pretrained takes, "org/name", read as a missing relative folder
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match=r"local folders only.*snapshot_download\('Qwen/Qwen3-30B-A3B'\)"):
        moekit.load_moe_layers("Qwen/Qwen3-30B-A3B", progress=False)
    assert inspect_main(["Qwen/Qwen3-30B-A3B"]) == 2
    _one_line(capsys, "local folders only", "snapshot_download")


def test_a_hub_cache_folder_names_its_snapshot(tmp_path, capsys):
    # edge: the cache's models--org--name folder (snapshots/, refs/main) in place of its snapshot folder
    root, snap = _hub_cache(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="hub cache folder.*" + snap.replace(".", r"\.")):
        moekit.load_moe_layers(root, progress=False)
    assert inspect_main([root]) == 1
    _one_line(capsys, "hub cache folder", snap)
    assert list(moekit.load_moe_layers(snap, progress=False)) == [PRE[:-1]]  # the folder named loads


def test_a_tilde_path_hints_expanduser(tmp_path, monkeypatch, capsys):
    # edge: "~/..." is not expanded by Python (the shell does it): the error showed the path, no hint
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(CheckpointNotFoundError, match=r"expanduser.*" + str(tmp_path).replace(".", r"\.") + "/ckpt"):
        moekit.load_moe_layers("~/ckpt", progress=False)
    assert inspect_main(["~/ckpt"]) == 2
    _one_line(capsys, "expanduser")


# --- 5. checkpoints quantised in formats moekit does not read

@pytest.mark.parametrize("q, needles", [
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"}, ("'awq'",)),  # edge: AWQ
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, ("'gptq'",)),  # edge: GPTQ
    ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, ("load_in_4bit", "bitsandbytes")),  # edge: no quant_method
])
def test_an_unread_quant_method_names_config_json(tmp_path, q, needles, capsys):
    path = _write(tmp_path, _block(), _qwen3(quantization_config=q))
    with pytest.raises(NotImplementedError) as err:
        moekit.load_moe_layers(path, progress=False)  # (no quant_config= passed: the message blamed it)
    msg = str(err.value)
    assert "config.json's quantization_config" in msg and "quant_config option" not in msg, msg
    assert all(n in msg for n in needles + ("fp8", "mxfp4", "compressed-tensors", "full-precision")), msg
    assert inspect_main([path]) == 1
    _one_line(capsys, "config.json's quantization_config", *needles)


# --- 6. a broken symlink (an interrupted hub download)

@pytest.mark.parametrize("indexed", [False, True])
def test_a_broken_symlink_is_named(tmp_path, indexed, capsys):
    # edge: snapshots/<rev>/model.safetensors links to a blob not (yet) there: a raw FileNotFoundError (no index) or
    # "does not exist" (index)
    path = _write(tmp_path / "ckpt", _block(), name="blob.bin")
    os.symlink(os.path.join(path, "gone"), os.path.join(path, "model-00001-of-00001.safetensors"))
    os.remove(os.path.join(path, "blob.bin"))
    if indexed:
        index = {k: "model-00001-of-00001.safetensors" for k in _block()}
        (tmp_path / "ckpt" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    with pytest.raises(CheckpointNotFoundError, match=r"model-00001-of-00001\.safetensors .*is a broken symlink to "
                                                      r"\S+gone \(an interrupted download"):
        moekit.load_moe_layers(path, progress=False)
    if not indexed:  # (inspect reads no missing shard an index names; a listed one it must read)
        assert inspect_main([path]) == 1
        _one_line(capsys, "broken symlink")


# --- 7. a bytes path; a header whose shape disagrees with its bytes

def test_a_bytes_path_loads(tmp_path):
    # edge: os.fspath keeps bytes, and os.path.join(bytes, "config.json") raised a TypeError about str and bytes
    path = _write(tmp_path, _block())
    assert list(moekit.load_moe_layers(os.fsencode(path), progress=False)) == [PRE[:-1]]


def test_a_shape_that_disagrees_with_its_offsets_is_refused_by_inspect_too(tmp_path, capsys):
    # edge: [4, 16] -> [5, 16] in the header: load_moe_layers refused it (safetensors on open), inspect exited 0
    path = _write(tmp_path, _block())
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + n].replace(b'"shape":[4,16]', b'"shape":[5,16]', 1)
    assert header != data[8 : 8 + n]
    file.write_bytes(data[:8] + header + data[8 + n :])
    assert inspect_main([path]) == 1
    _one_line(capsys, "model.safetensors is not a readable", "needs 320 bytes")
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable .*shape \[5, 16\].*needs 320 bytes"):
        moekit.load_moe_layers(path, progress=False)  # (the same words)
