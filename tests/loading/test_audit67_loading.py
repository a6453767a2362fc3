"""Round 67's audit, checkpoint loading: defects found by review helpers and reproduced."""

from __future__ import annotations

import torch

import moekit
from test_loader_synthetic import V4_CONFIG, _v4_tensors, write_checkpoint


def test_load_moe_layers_leaves_the_callers_random_stream_alone(tmp_path):
    # edge: the gate's and the shared expert's nn.Linear initialisers drew from the global generator before the
    # checkpoint overwrote them: after torch.manual_seed(s), a user's later draws (sampling) depended on whether a
    # checkpoint was loaded. The small modules are built on meta now and given memory without initialisers.
    write_checkpoint(str(tmp_path), V4_CONFIG, _v4_tensors(0), shards=1)
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    layers = moekit.load_moe_layers(str(tmp_path), progress=False)
    assert torch.equal(torch.rand(3), want)
    for layer in layers.values():  # every parameter of the small modules came from the checkpoint (none unset)
        assert layer.shared_experts is not None
        for name, p in layer.named_parameters():
            if not name.startswith("routed_experts."):
                assert p.device.type == "cpu" and torch.isfinite(p).all(), name
