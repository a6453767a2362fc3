"""Round 68: transformers' inference recipes with moekit (audit). Each case names the edge it covers."""

from __future__ import annotations

import copy
import os
import sys
import warnings

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, os.path.dirname(__file__))
import hf_tiny  # noqa: E402

from moekit.integrations.transformers import check_registered, patch, register  # noqa: E402


@pytest.mark.parametrize("fullgraph", [True, False])
def test_switch_on_gpt_oss_compiles_for_static_cache_generation(fullgraph):
    # edge: experts_implementation="moekit" on gpt-oss (stacks stored transposed and interleaved, converted and
    # cached per module): the cache's key (is_inference, versions) and its attribute write broke fullgraph, and
    # without fullgraph every experts call broke the graph and hit the recompile limit; transformers' compiled
    # generation recipe (static cache, torch.compile(model.forward)) now traces like its own experts
    from torch._dynamo.utils import counters

    ref = hf_tiny.build("gpt_oss")
    sw = copy.deepcopy(ref)
    ref.set_experts_implementation("grouped_mm")  # (transformers' default; its "eager" loop does not compile)
    sw.set_experts_implementation(register())
    check_registered(sw)
    ids = torch.randint(1, 96, (1, 6), generator=torch.Generator().manual_seed(0))
    graphs, outs = [], []
    for model in (ref, sw):
        torch._dynamo.reset()
        counters.clear()
        model.forward = torch.compile(model.forward, backend="eager", fullgraph=fullgraph)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                outs.append(model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static"))
            except torch._dynamo.exc.Unsupported as err:
                if model is sw:
                    raise
                pytest.skip(f"transformers' own model does not compile with this torch / transformers: {err}"[:200])
        graphs.append((counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())))
    torch._dynamo.reset()
    assert torch.equal(outs[0], outs[1])
    assert graphs[1] == graphs[0], f"moekit {graphs[1]} vs transformers' experts {graphs[0]} (graphs, breaks)"


def test_save_warning_of_a_block_unpatch_cannot_restore():
    # edge: gpt-oss patched without restorable=True drops its original stacks (converted copies): the state_dict
    # warning advised unpatch(model), which then refuses; it now says what would work
    model = hf_tiny.build("gpt_oss", intermediate_size=1024)  # stacks past the size kept without restorable=True
    patch(model)
    with pytest.warns(UserWarning, match="restorable=True"):
        model.state_dict()
