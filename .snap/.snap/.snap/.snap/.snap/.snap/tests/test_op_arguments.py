"""Op-level arguments out of range or of the wrong type raise, naming the argument."""

import pytest
import torch

import moekit
from moekit.ops.experts import fused_experts_torch


def test_expert_map_out_of_range_raises():
    # a local slot index >= E_local would silently drop the token's slot
    x, w1, w2 = torch.randn(3, 8), torch.randn(2, 8, 8), torch.randn(2, 8, 4)
    ids, w = torch.tensor([[1], [0], [2]], dtype=torch.int32), torch.ones(3, 1)
    with pytest.raises(ValueError, match="expert_map"):
        fused_experts_torch(x, w1, w2, w, ids, expert_map=torch.tensor([0, 5, 1], dtype=torch.int32))


def test_float_indices_type_raises():
    with pytest.raises(TypeError, match="indices_type"):
        moekit.fused_topk(None, torch.randn(4, 8), 2, True, indices_type=torch.float32, backend="torch")
