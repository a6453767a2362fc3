"""Review of round 69's diff: what its first versions broke for artefacts of round 68 (a pickled layer's loaded-record
holding the old bool, a pickled gpt-oss experts module holding the old tuple cache of the experts switch)."""

import os
import sys

import pytest
import torch

import moekit


def test_an_old_records_unset_mark_keeps_its_explanation():
    # edge: round 68's record held unset_loaded=True (round 69 names the kind: "unset" / "legacy"); the refusal of
    # a layer pickled then lost its "(NaN weights or NaN scales)" explanation
    layer = moekit.FusedMoE(8, 2, 32, 16)
    record = layer.routed_experts._record
    record.unset_loaded = True
    with pytest.raises(RuntimeError, match="NaN weights or NaN scales"):
        layer(torch.randn(3, 32), torch.randn(3, 8))


def test_an_old_tuple_cache_of_the_experts_switch_is_replaced():
    # edge: a gpt-oss experts module pickled by round 68 holds `_moekit_converted` as a (key, stacks) tuple; round
    # 69's cache object was read from it ("'tuple' object has no attribute 'made_from'")
    pytest.importorskip("transformers")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "integrations"))
    import hf_tiny

    from moekit.integrations._experts import experts_weights

    model = hf_tiny.build("gpt_oss")
    experts = model.model.layers[0].mlp.experts
    experts._moekit_converted = ((), ())
    with torch.no_grad():
        w13, w2, b13, b2 = experts_weights(experts)
    assert w13.shape[0] == experts.gate_up_proj.shape[0]
