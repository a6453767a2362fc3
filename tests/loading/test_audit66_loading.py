"""Round 66: loading's cost and what it keeps of the checkpoint files. Each case names the edge it covers."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import moekit
import moekit.experts.mapping as mapping
from moekit.loading.reader import Reader
from test_loader_quant import FP8
from test_loader_quant_shared import _ds3


def _mapped_files() -> list[tuple[int, int]]:
    """Address ranges of the .safetensors files this process maps (Linux)."""
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5].endswith(".safetensors"):
                lo, hi = (int(v, 16) for v in parts[0].split("-"))
                spans.append((lo, hi))
    return spans


def _write_sharded(path, cfg, tensors, shards=2):
    keys = sorted(tensors)
    index = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k].clone().contiguous() for k in keys[s::shards]}
        save_file(part, os.path.join(path, name), metadata={"format": "pt"})
        index.update(dict.fromkeys(part, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    (path / "config.json").write_text(json.dumps(cfg))


def test_the_expert_mapping_is_made_once_per_layer(tmp_path, monkeypatch):
    # edge: the loader calls load_layer_weights once per tensor, and each call made the whole default mapping (6 E
    # entries) again: O(E²) a layer (E = 512 tiny experts: 25 s, 8 ms a tensor)
    E, H, I, L = 16, 16, 8, 2
    g = torch.Generator().manual_seed(0)
    t = {}
    for layer in range(L):
        pre = f"model.layers.{layer}.mlp."
        t[pre + "gate.weight"] = torch.randn(E, H, generator=g)
        for e in range(E):
            for proj, shape in {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}.items():
                t[pre + f"experts.{e}.{proj}.weight"] = torch.randn(*shape, generator=g)
    cfg = dict(model_type="qwen3_moe", hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=2,
               num_hidden_layers=L, norm_topk_prob=True, dtype="float32", hidden_act="silu")
    _write_sharded(tmp_path, cfg, t)
    made = []
    real = mapping.default_expert_mapping
    monkeypatch.setattr(mapping, "default_expert_mapping", lambda layer: made.append(1) or real(layer))
    layers = moekit.load_moe_layers(str(tmp_path), progress=False)
    assert len(made) == L  # once per layer (it was once per tensor: 2 * 3 * 16 + 2)
    w = t["model.layers.1.mlp.experts.7.up_proj.weight"]
    assert torch.equal(layers["model.layers.1.mlp"].routed_experts.w13_weight[7, I:], w)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
def test_no_loaded_tensor_lives_in_a_checkpoint_files_mapping(tmp_path):
    # edge: the selection bias (fp32 on CPU: .to() a no-op) and a shipped fp8 shared expert's w2 and scales were the
    # safetensors tensors themselves, views of the file's mapping: the shards stayed mapped (their read pages in RSS)
    # and a rewritten shard changed the loaded routing
    cfg, t, _ = _ds3(48, 40, FP8, dtype="float32")
    t["model.layers.1.mlp.gate.e_score_correction_bias"] = torch.rand(4)
    _write_sharded(tmp_path, cfg, t)
    layer = moekit.load_moe_layers(str(tmp_path), progress=False)["model.layers.1.mlp"]
    spans = _mapped_files()
    held = [n for n, x in list(layer.named_parameters()) + list(layer.named_buffers())
            if any(lo <= x.untyped_storage().data_ptr() < hi for lo, hi in spans)]
    assert held == []
    assert torch.equal(layer.router.e_score_correction_bias, t["model.layers.1.mlp.gate.e_score_correction_bias"])


def test_the_reads_keep_one_file_mapped(tmp_path, monkeypatch):
    # edge: every shard's mapping stayed open until the load ended, so the process's RSS grew by every page read of
    # the whole checkpoint; the storage-order reads release each file as they move past it (each opened once)
    E, H, I = 4, 16, 8
    g = torch.Generator().manual_seed(0)
    t = {"model.layers.0.mlp.gate.weight": torch.randn(E, H, generator=g)}
    for e in range(E):
        for proj, shape in {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}.items():
            t[f"model.layers.0.mlp.experts.{e}.{proj}.weight"] = torch.randn(*shape, generator=g)
    cfg = dict(model_type="qwen3_moe", hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=2,
               num_hidden_layers=1, norm_topk_prob=True, dtype="float32", hidden_act="silu")
    _write_sharded(tmp_path, cfg, t, shards=3)
    mapped, opened, real_read = [], [], Reader.read

    def read(self, key):
        if self.files[key] not in self.handles:
            opened.append(self.files[key])
        out = real_read(self, key)
        mapped.append(len(self.handles))
        return out

    monkeypatch.setattr(Reader, "read", read)
    layer = moekit.load_moe_layers(str(tmp_path), progress=False)["model.layers.0.mlp"]
    assert max(mapped) == 1 and len(opened) == len(set(opened)) == 3
    assert torch.equal(layer.routed_experts.w2_weight[3], t["model.layers.0.mlp.experts.3.down_proj.weight"])
