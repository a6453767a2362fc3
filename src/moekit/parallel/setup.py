"""Glue between :func:`moekit.FusedMoE` and the parallel pieces: placement, EPLB state, executor."""

from __future__ import annotations

from dataclasses import dataclass

from .comm import check_group, group_rank, group_size
from .eplb_state import EplbState
from .executor import ParallelExecutor
from .placement import ExpertPlacement


@dataclass
class ParallelSetup:
    placement: ExpertPlacement
    ep_group: object
    tp_group: object
    eplb_state: EplbState | None

    def install(self, runner) -> None:
        """Give ``runner`` its executor and its router the EPLB routing hook."""
        runner.expert_executor = ParallelExecutor(self.placement, self.ep_group, self.tp_group, self.eplb_state)
        if self.eplb_state is not None:
            runner.router.eplb_state = self.eplb_state
            runner.router.enable_eplb = True


def build_parallel(
    *,
    num_experts: int,
    num_redundant_experts: int,
    ep_group,
    tp_group,
    tp_size: int | None,
    strategy: str,
    enable_eplb: bool,
    num_expert_group: int | None,
    device,
) -> ParallelSetup:
    """Validate the groups and sizes (``ValueError``/``TypeError`` naming them) and build the pieces."""
    check_group("ep_group", ep_group)
    check_group("tp_group", tp_group)
    if ep_group is not None and tp_group is not None:
        import torch.distributed as dist

        shared = set(dist.get_process_group_ranks(ep_group)) & set(dist.get_process_group_ranks(tp_group))
        if shared != {dist.get_rank()}:
            raise ValueError(
                f"ep_group and tp_group must meet only in this rank ({dist.get_rank()}), they share ranks "
                f"{sorted(shared)}: TP peers hold the same tokens and EP peers different ones"
            )
    w_tp = group_size(tp_group)
    if tp_size not in (None, w_tp):
        raise ValueError(f"tp_size={tp_size} does not match the size of tp_group ({w_tp})")
    if isinstance(num_redundant_experts, bool) or not isinstance(num_redundant_experts, int):
        raise TypeError(f"num_redundant_experts must be an int, got {num_redundant_experts!r}")
    placement = ExpertPlacement.build(
        num_experts,
        num_redundant_experts,
        ep_size=group_size(ep_group),
        ep_rank=group_rank(ep_group),
        tp_size=w_tp,
        tp_rank=group_rank(tp_group),
        strategy=strategy,
    )
    state = None
    if enable_eplb:
        groups = num_expert_group if num_expert_group and num_experts % num_expert_group == 0 else 1
        state = EplbState(placement, num_groups=groups, device=device)
    return ParallelSetup(placement, ep_group, tp_group, state)
