"""Round 53 (docs audit): check_registered passed Muse Spark, whose experts carry a post-expert norm that the experts
switch refuses at the first forward; it is one of the blocks the switch does not run now (patch() runs them)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, os.path.dirname(__file__))
import hf_tiny13  # noqa: E402

from moekit.integrations.transformers import check_registered, patch, register  # noqa: E402


def test_check_registered_refuses_muse_sparks_post_expert_norm():
    # edge: the switch reaches the experts class (decorated) but cannot run its post-expert norm
    try:
        model = hf_tiny13.build("muse_spark", seed=1)  # (None: the installed transformers has no muse_spark_text)
    except (ValueError, KeyError, ImportError) as err:  # an older transformers without Muse Spark
        pytest.skip(f"transformers {transformers.__version__}: no muse_spark ({err})")
    if model is None:
        pytest.skip(f"transformers {transformers.__version__} has no muse_spark_text")
    model.eval()
    register()
    model.set_experts_implementation("moekit")
    with pytest.raises(NotImplementedError, match=r"post-expert norm.*patch\(model\)"):
        check_registered(model)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        patched = hf_tiny13.build("muse_spark", seed=1).eval()
        ref = patched(input_ids=ids)[0]
        assert patch(patched)
        torch.testing.assert_close(patched(input_ids=ids)[0], ref, rtol=1e-4, atol=1e-4)
