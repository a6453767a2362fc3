"""How load_moe_layers reads: a progress bar over the bytes (tqdm; off when not a terminal or with
progress=False), each file opened once and read in storage order, tensors copied straight into the
preallocated weights, and unreadable files named in the error."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_loader_synthetic import V4_CONFIG, _v4_tensors, write_checkpoint  # noqa: E402

from moekit import load_moe_layers  # noqa: E402
from moekit.loading import reader as reader_mod  # noqa: E402
from moekit.loading.files import checkpoint_files, read_header  # noqa: E402


def _ffn_bytes(t):
    return sum(v.numel() * v.element_size() for k, v in t.items() if ".ffn." in k and not k.endswith(("gate.bias", "tid2eid")))


def test_progress_bar_counts_the_bytes_read(tmp_path, capsys):
    t = _v4_tensors(1)
    write_checkpoint(tmp_path, V4_CONFIG, t, shards=2)
    load_moe_layers(tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "moekit: loading MoE layers" in err and "100%" in err
    assert f"{_ffn_bytes(t) / 1000:.1f}k" in err or f"{_ffn_bytes(t) / 1000:.0f}k" in err, err[-300:]
    load_moe_layers(tmp_path, progress=False)
    assert capsys.readouterr().err == ""
    load_moe_layers(tmp_path)  # default: only on a terminal (pytest captures stderr: not one)
    assert "moekit: loading" not in capsys.readouterr().err


def test_each_file_is_opened_once_and_read_in_storage_order(tmp_path, monkeypatch):
    t = _v4_tensors(2)
    write_checkpoint(tmp_path, V4_CONFIG, t, shards=3)
    opened, reads = [], []
    import safetensors

    real_open = safetensors.safe_open

    def counting_open(path, *a, **k):
        opened.append(os.path.basename(path))
        return real_open(path, *a, **k)

    real_read = reader_mod._read

    def recording_read(handle, key):
        reads.append(key)
        return real_read(handle, key)

    monkeypatch.setattr(safetensors, "safe_open", counting_open)
    monkeypatch.setattr(reader_mod, "_read", recording_read)
    layers = load_moe_layers(tmp_path, progress=False)
    assert sorted(opened) == sorted(set(opened)) and len(opened) == 3
    assert len(reads) == len(set(reads))  # every tensor read once
    files = checkpoint_files(str(tmp_path))
    streamed = [k for k in reads if not k.endswith(("gate.bias", "tid2eid"))]  # after the construction tensors
    headers = {f: read_header(f) for f in set(files.values())}
    order = [(sorted(headers).index(files[k]), headers[files[k]][k][1]) for k in streamed]
    assert order == sorted(order)
    w = layers["model.layers.1.mlp"].routed_experts.w13_weight
    torch.testing.assert_close(w[2, :8], t["layers.1.ffn.experts.2.w1.weight"])  # gate rows
    torch.testing.assert_close(w[2, 8:], t["layers.1.ffn.experts.2.w3.weight"])  # up rows


def test_converts_dtype_while_copying(tmp_path):
    t = _v4_tensors(3)
    write_checkpoint(tmp_path, V4_CONFIG, t, shards=1)
    layers = load_moe_layers(tmp_path, dtype=torch.bfloat16, progress=False)
    w2 = layers["model.layers.2.mlp"].routed_experts.w2_weight
    assert w2.dtype == torch.bfloat16
    assert torch.equal(w2[5], t["layers.2.ffn.experts.5.w2.weight"].bfloat16())


def test_torch_threads_are_restored(tmp_path):
    t = _v4_tensors(4)
    write_checkpoint(tmp_path, V4_CONFIG, t, shards=1)
    before = torch.get_num_threads()
    load_moe_layers(tmp_path, progress=False)
    assert torch.get_num_threads() == before


def test_unreadable_files_are_named(tmp_path):
    t = _v4_tensors(5)
    write_checkpoint(tmp_path / "trunc", V4_CONFIG, t, shards=2)
    shard = tmp_path / "trunc" / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model-00002-of-00002\.safetensors.*(truncated or corrupt|readable)"):
        load_moe_layers(tmp_path / "trunc", progress=False)
    write_checkpoint(tmp_path / "garbage", V4_CONFIG, t, shards=1)
    (tmp_path / "garbage" / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable"):
        load_moe_layers(tmp_path / "garbage", progress=False)
    os.makedirs(tmp_path / "cfg")
    (tmp_path / "cfg" / "config.json").write_text('{"model_type": "mixtral",')
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        load_moe_layers(tmp_path / "cfg")
    (tmp_path / "cfg" / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match=r"config\.json must hold a JSON object"):
        load_moe_layers(tmp_path / "cfg")


def test_overlapping_loads_restore_the_thread_count():
    # round 49: each load saved torch's intra-op threads, set 1 and restored its own save: two overlapping loads
    # (threads) left the process at 1 thread (B saved A's 1). The first load saves, the last one restores
    from moekit.loading.reader import one_thread as _one_thread

    before = torch.get_num_threads()
    a, b = _one_thread(), _one_thread()
    a.__enter__()
    b.__enter__()
    assert torch.get_num_threads() == 1
    a.__exit__(None, None, None)
    assert torch.get_num_threads() == 1  # b still copies
    b.__exit__(None, None, None)
    assert torch.get_num_threads() == before
