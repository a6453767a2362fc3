"""Which checkpoint tensors a rank of an expert-parallel layer skips when loading (``_LayerLoad.elsewhere``): the
per-expert tensors of experts no slot of the rank holds, never a static input scale (every slot holds the max over
all experts: round 51's review found EP ranks taking the max over their own experts only)."""

from __future__ import annotations

from types import SimpleNamespace

from moekit.experts.placement import ExpertPlacement
from moekit.loading.loader import _LayerLoad


def _state(**placement) -> _LayerLoad:
    layer = SimpleNamespace(routed_experts=SimpleNamespace(placement=ExpertPlacement.build(8, **placement)))
    return _LayerLoad(plan=None, layer=layer)


def test_rank_skips_other_ranks_experts_but_not_input_scales():
    rank0 = _state(ep_size=2, ep_rank=0)  # linear: experts 0-3 here
    assert not rank0.elsewhere("experts.3.gate_proj.weight") and rank0.elsewhere("experts.4.gate_proj.weight")
    assert rank0.elsewhere("experts.7.down_proj.weight_scale_inv") and rank0.elsewhere("experts.5.w1.scale")
    assert not rank0.elsewhere("experts.5.gate_proj.input_scale")  # static fp8: the max over ALL experts
    assert not rank0.elsewhere("experts.gate_up_proj") and not rank0.elsewhere("shared_experts.gate_proj.weight")
    assert not rank0.elsewhere("gate.weight")
    rr = _state(ep_size=2, ep_rank=1, strategy="round_robin")  # odd experts here
    assert rr.elsewhere("experts.2.up_proj.weight") and not rr.elsewhere("experts.3.up_proj.weight")
    tp = _state(tp_size=2, tp_rank=1)  # tensor parallelism alone: every expert (a slice of each) is read
    assert not any(tp.elsewhere(f"experts.{e}.gate_proj.weight") for e in range(8))
    single = _state()
    assert not single.elsewhere("experts.7.gate_proj.weight")
