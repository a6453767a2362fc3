"""moekit inspect: a table from config.json alone."""

import json

from moekit.loading.inspect import inspect_main, rows


def _write(tmp_path, cfg):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path)


DS3 = dict(
    model_type="deepseek_v3", hidden_size=7168, moe_intermediate_size=2048, n_routed_experts=256, num_experts_per_tok=8,
    n_group=8, topk_group=4, n_shared_experts=1, num_hidden_layers=61, first_k_dense_replace=3,
)  # fmt: skip


def test_inspect_groups_layers_and_sizes(tmp_path, capsys):
    assert inspect_main([_write(tmp_path, DS3)]) == 0
    out = capsys.readouterr().out
    assert "DeepSeek-V3" in out and "58 MoE blocks of 61 layers" in out
    assert "3-60" in out and "256" in out and "1 x 2048" in out
    assert "grouped top-k (G=8, keep 4)" in out
    # one expert: 3 * 7168 * 2048 * 2 bytes = 84 MiB; per token: 8 experts + shared + router
    assert "84.0 MiB" in out
    arch, table = rows(DS3)
    assert len(table) == 1 and table[0]["_count"] == 58


def test_inspect_zero_and_hash_layers(tmp_path, capsys):
    cfg = dict(model_type="longcat_flash", hidden_size=64, expert_ffn_hidden_size=32, n_routed_experts=8,
               zero_expert_num=4, moe_topk=3, num_layers=2)  # fmt: skip
    assert inspect_main([_write(tmp_path, cfg)]) == 0
    assert "8 + 4 zero" in capsys.readouterr().out
    _, table = rows(dict(model_type="deepseek_v4", hidden_size=64, moe_intermediate_size=32, n_routed_experts=8,
                         num_experts_per_tok=2, num_hidden_layers=5))  # fmt: skip
    assert [r["layers"] for r in table] == ["0-2", "3-4"] and table[0]["routing"].startswith("hash")


def test_inspect_errors(tmp_path, capsys):
    assert inspect_main([str(tmp_path / "nope")]) == 2
    assert inspect_main([_write(tmp_path, {"model_type": "bert"})]) == 1
    assert "supported architectures" in capsys.readouterr().err
