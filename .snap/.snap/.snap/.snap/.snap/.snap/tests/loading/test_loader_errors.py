"""load_moe_layers error paths of issue #12: a malformed config.json / index, a corrupt or truncated shard
(the error names the file), dtype names, and device="cuda" on a machine without CUDA."""

import os
import re

import pytest
import torch

from moekit import load_moe_layers
from test_loader_synthetic import V4_CONFIG, _v4_tensors, write_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("v4"))
    write_checkpoint(path, V4_CONFIG, _v4_tensors(), shards=3)
    return path


def _copy(src, dst):
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
            g.write(f.read())
    return dst


def _shard(path, i=2):
    return os.path.join(path, f"model-{i:05d}-of-00003.safetensors")


@pytest.mark.parametrize("dtype, expected", [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                             ("fp16", torch.float16), ("torch.float32", torch.float32)])
def test_dtype_names_accepted(checkpoint, dtype, expected):
    layers = load_moe_layers(checkpoint, dtype=dtype)
    assert {layer.moe_config.params_dtype for layer in layers.values()} == {expected}


def test_bad_dtype_and_device(checkpoint):
    with pytest.raises(TypeError, match=r"dtype must be one of .*'bf16'.*got 'bf17'"):
        load_moe_layers(checkpoint, dtype="bf17")
    with pytest.raises(ValueError, match="device='tpu' is not a device"):
        load_moe_layers(checkpoint, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda': no CUDA device is available"):
            load_moe_layers(checkpoint, device="cuda")


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_corrupt_shard_names_the_file(checkpoint, tmp_path, how):
    path = _copy(checkpoint, str(tmp_path / "ckpt"))
    shard = _shard(path)
    data = open(shard, "rb").read()
    with open(shard, "wb") as f:
        f.write(data[: len(data) // 2] if how == "truncated" else b"\x07" * 64)
    with pytest.raises(ValueError, match=re.escape(shard) + r".*(corrupt|truncated)"):
        load_moe_layers(path)


def test_malformed_config_and_index_name_the_file(checkpoint, tmp_path):
    cases = [  # (checkpoint copy, file, its broken text, what the error says after the file's name)
        ("ckpt", "config.json", '{"model_type": "deepseek_v4", ', r".*(not valid JSON|malformed)"),
        ("ckpt", "config.json", "[1, 2]", r".*JSON object"),
        ("ckpt2", "model.safetensors.index.json", '{"weight_map": ', r".*(index|weight_map)"),
    ]
    for copy, name, text, says in cases:
        path = str(tmp_path / copy)
        if not os.path.isdir(path):
            _copy(checkpoint, path)
        target = os.path.join(path, name)
        with open(target, "w") as f:
            f.write(text)
        with pytest.raises(ValueError, match=re.escape(target) + says):
            load_moe_layers(path)
