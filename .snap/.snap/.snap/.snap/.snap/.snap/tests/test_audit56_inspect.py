"""Round 56: ``moekit inspect`` shows the dtype the checkpoint's expert tensors have on disk.

The quant column said ``bf16`` (and the sizes were at 2 bytes per element) for every full-precision checkpoint, also
one whose expert tensors are fp32 or fp16 in the ``.safetensors`` files; it now reads the dtype from the headers of
the shards holding the experts (no tensor read), notes a config.json dtype that disagrees, and falls back to
config.json's dtype where no header is there (config.json alone, a shard not downloaded yet).
"""

import json

import torch
from safetensors.torch import save_file

from moekit.cli import main
from moekit.loading import supported_model_types
from test_audit53_cli import _one_line  # one stderr line naming the needles, no traceback

H, I, E = 16, 8, 4
QWEN3 = dict(model_type="qwen3_moe", hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=2,
             num_hidden_layers=2)


def _tensors(expert_dtype, gate_dtype=None):
    """The MoE tensors of both layers of :data:`QWEN3`: experts in ``expert_dtype``, router in ``gate_dtype``."""
    out = {}
    for layer in range(2):
        pre = f"model.layers.{layer}.mlp."
        out[pre + "gate.weight"] = torch.zeros(E, H, dtype=gate_dtype or expert_dtype)
        for e in range(E):
            for proj, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                out[f"{pre}experts.{e}.{proj}.weight"] = torch.zeros(shape, dtype=expert_dtype)
    return out


def _checkpoint(tmp_path, config, tensors=None, shards=1, keep=None):
    """config.json and the tensors in ``shards`` files (an index for several); ``keep``: the shard files to leave on
    disk (the others listed by the index only, as in a partial download)."""
    (tmp_path / "config.json").write_text(json.dumps(config))
    if tensors is None:
        return str(tmp_path)
    if shards == 1:
        save_file(tensors, str(tmp_path / "model.safetensors"))
        return str(tmp_path)
    keys, weight_map = sorted(tensors), {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        if keep is None or s in keep:
            save_file({k: tensors[k] for k in keys[s::shards]}, str(tmp_path / name))
        weight_map.update({k: name for k in keys[s::shards]})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return str(tmp_path)


def _inspect(path, capsys):
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out.splitlines()
    return out[3].split(" | "), out[-1]  # the first row's cells, the footer


def test_fp32_experts_show_fp32_not_the_declared_bf16(tmp_path, capsys):
    # the reported case: config.json says bfloat16, the files hold fp32 experts: the column said bf16 and one expert
    # 3 * 16 * 8 * 2 = 768 B; it is 1.5 KiB on disk
    cells, foot = _inspect(_checkpoint(tmp_path, dict(QWEN3, torch_dtype="bfloat16"), _tensors(torch.float32)), capsys)
    assert cells[9].strip() == "fp32" and cells[10].strip() == "1.5 KiB"
    assert "at fp32 (as stored in the .safetensors files; config.json's torch_dtype says bf16)" in foot


def test_fp16_experts_of_a_sharded_checkpoint_without_a_declared_dtype(tmp_path, capsys):
    # edge: experts in several shards through the index; config.json declares no dtype (no note then)
    path = _checkpoint(tmp_path, QWEN3, _tensors(torch.float16), shards=3)
    cells, foot = _inspect(path, capsys)
    assert cells[9].strip() == "fp16" and cells[10].strip() == "768 B"
    assert foot.endswith("at fp16 (as stored in the .safetensors files); expert weights read per token: 3.2 KiB")


def test_the_experts_dtype_counts_not_the_routers(tmp_path, capsys):
    # edge: bf16 experts beside an fp32 router (as transformers keeps some gates) under a config.json saying float32
    tensors = _tensors(torch.bfloat16, gate_dtype=torch.float32)
    cells, foot = _inspect(_checkpoint(tmp_path, dict(QWEN3, dtype="float32"), tensors), capsys)
    assert cells[9].strip() == "bf16" and "config.json's dtype says fp32" in foot


def test_without_headers_the_declared_dtype_is_shown(tmp_path, capsys):
    # edge: config.json alone (inspect before downloading the weights) declaring float32: it showed bf16 sizes
    (tmp_path / "a").mkdir()
    cells, foot = _inspect(_checkpoint(tmp_path / "a", dict(QWEN3, torch_dtype="float32")), capsys)
    assert cells[9].strip() == "fp32" and cells[10].strip() == "1.5 KiB"
    assert "at fp32 (config.json's torch_dtype; no .safetensors header read)" in foot
    # edge: an index whose shards holding the experts are not on disk yet: the declared dtype, no error
    (tmp_path / "b").mkdir()
    path = _checkpoint(tmp_path / "b", dict(QWEN3, torch_dtype="float16"), _tensors(torch.float32), shards=2, keep=())
    cells, foot = _inspect(path, capsys)
    assert cells[9].strip() == "fp16" and "config.json's torch_dtype; no .safetensors header read" in foot


def test_an_unsupported_model_type_is_one_line_with_a_suggestion(tmp_path, capsys):
    # edge: the unsupported model_type's error lists every supported type on the lines after its first: inspect
    # prints the first (the CLI's one-line errors), which names the value, a close match and the count
    assert main(["inspect", _checkpoint(tmp_path, dict(QWEN3, model_type="qwen3moe"))]) == 1
    err = _one_line(capsys, "model_type='qwen3moe' is not supported (did you mean 'qwen3_moe'?)",
                    f"({len(supported_model_types())} model types in all: moekit.loading.supported_model_types())")
    assert len(err) < 400
