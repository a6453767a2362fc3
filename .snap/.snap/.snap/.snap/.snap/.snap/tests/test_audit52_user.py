"""Round 52's user audit: ``moekit inspect`` on configs a user meets (wrappers, per-layer limits, interleaved MoE
layers, decoder-layer MoE, configs ``load_moe_layers`` refuses) and the README's count of supported model types."""

import json
import re
from pathlib import Path

import pytest

from moekit.loading.inspect import inspect_main, rows

README = Path(__file__).resolve().parents[1] / "README.md"
QWEN3 = dict(model_type="qwen3_moe", hidden_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
             num_hidden_layers=2)
DS3 = dict(model_type="deepseek_v3", hidden_size=32, moe_intermediate_size=16, n_routed_experts=6,
           num_experts_per_tok=2, n_group=3, topk_group=2, n_shared_experts=1, num_hidden_layers=3,
           first_k_dense_replace=1)


def _inspect(tmp_path, cfg, capsys):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    code = inspect_main([str(tmp_path)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("cfg, head", [
    # a multimodal wrapper: the layers are the text tower's (printed "of ? layers" before)
    (dict(model_type="qwen3_vl_moe", text_config=dict(QWEN3, model_type="qwen3_vl_moe_text", num_hidden_layers=4)),
     "4 MoE blocks of 4 layers"),
    # a config leaving num_hidden_layers to its transformers class (24 for Qwen3-MoE), as the plans read it
    ({k: v for k, v in QWEN3.items() if k != "num_hidden_layers"}, "24 MoE blocks of 24 layers"),
])
def test_inspect_counts_the_layers_the_plans_read(tmp_path, capsys, cfg, head):
    code, out, _ = _inspect(tmp_path, cfg, capsys)
    assert code == 0 and head in out.splitlines()[0]


def test_inspect_rows_keep_per_layer_swiglu_limits(tmp_path):
    # Step-3.x: a SwiGLU limit per layer; layers 1-3 were one row showing layer 1's limit for all three
    cfg = dict(model_type="step3p5", hidden_size=32, moe_intermediate_size=16, moe_num_experts=8, moe_top_k=2,
               num_hidden_layers=4, mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
               swiglu_limits=[0, 7.0, 3.0, 3.0], swiglu_limits_shared=[0, 0, 0, 0], share_expert_dim=48)
    _, table = rows(cfg)
    assert [(r["layers"], r["act"]) for r in table] == [("1", "silu_post_clamp (limit 7)"),
                                                        ("2-3", "silu_post_clamp (limit 3)")]


def test_inspect_groups_interleaved_and_layer_level_blocks(tmp_path):
    # Llama 4 / Jamba: a MoE block every other layer was one row per block (24 rows for Llama 4 Maverick)
    llama4 = dict(model_type="llama4", text_config=dict(hidden_size=32, intermediate_size=16, num_local_experts=4,
                                                        num_experts_per_tok=1, num_hidden_layers=8,
                                                        interleave_moe_layer_step=2))
    _, table = rows(llama4)
    assert [(r["layers"], r["module"], r["_count"]) for r in table] == [("1,3,...,7", "feed_forward", 4)]
    # Gemma 4: the MoE is made of decoder-layer attributes; the module column showed the layer index ("0", "1")
    # and every layer got a row of its own
    gemma4 = dict(model_type="gemma4", text_config=dict(hidden_size=32, moe_intermediate_size=16, num_experts=4,
                                                        top_k_experts=2, num_hidden_layers=2, enable_moe_block=True))
    _, table = rows(gemma4)
    assert [(r["layers"], r["module"]) for r in table] == [("0-1", "(layer)")]


@pytest.mark.parametrize("cfg, message", [
    (dict(QWEN3, num_experts_per_tok=9), "top_k must be <= 8"),
    (dict(DS3, n_group=4), "num_expert_group (4) must divide the number of experts (6)"),
    (dict(DS3, topk_group=5), "topk_group must be <= num_expert_group (3)"),
    (dict(QWEN3, hidden_size=40, quantization_config={"quant_method": "mxfp4"}), "multiple of 32, got 40"),
])
def test_inspect_refuses_what_load_moe_layers_refuses(tmp_path, capsys, cfg, message):
    # these printed a normal table, and load_moe_layers then raised at construction
    code, out, err = _inspect(tmp_path, cfg, capsys)
    assert code == 1 and not out
    assert err.startswith("moekit inspect: error: model.layers.") and message in err


def test_inspect_error_lines(tmp_path, capsys, monkeypatch):
    code, _, err = _inspect(tmp_path, QWEN3, capsys)
    assert code == 0 and not err
    assert inspect_main([str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith("moekit inspect: error: argument path: expected a checkpoint directory")
    import moekit.loading.inspect as inspect_module

    def unreadable(path):
        raise PermissionError(13, "Permission denied", f"{path}/config.json")

    monkeypatch.setattr(inspect_module, "read_config", unreadable)  # a traceback before (only FileNotFoundError)
    assert inspect_main([str(tmp_path)]) == 1
    assert "Permission denied" in capsys.readouterr().err


def test_readme_counts_the_supported_model_types():
    from moekit.loading.architectures import SPECS, supported_model_types

    text = " ".join(README.read_text().split())
    types, specs = map(int, re.search(r"(\d+) model types in (\d+) specs", text).groups())
    assert (types, specs) == (len(supported_model_types()), len(SPECS))


@pytest.mark.parametrize("argv, message", [
    (["inspect"], "the following arguments are required: path"),
    (["inspect", "a", "b"], "unrecognized arguments: b"),
])
def test_inspect_usage_errors_are_one_line(capsys, argv, message):
    # README: "a bad option value exits 2 with one line"; inspect's own parser printed its usage line too
    from moekit.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moekit inspect: error: ") and message in err
