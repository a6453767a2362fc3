"""The parallel pieces :func:`moekit.FusedMoE` builds before its router and experts: the placement of
this rank (which experts, which slice of I) and, with EPLB, the routing state derived from it."""

from __future__ import annotations

from ..experts.placement import ExpertPlacement
from .comm import check_group, group_rank, group_size
from .eplb_state import EplbState
from .sync import agree_groups, fail_together


def build_placement(
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
    settings: tuple = (),
) -> tuple[ExpertPlacement, EplbState | None]:
    """Validate the groups and sizes (``ValueError``/``TypeError`` naming them); return this rank's
    placement and, with ``enable_eplb``, the :class:`EplbState` (routing maps, load window) over it.
    ``settings``: more ``(name, value)`` pairs of the layer (top_k, widths, dtype ...) that every rank of each group
    must share; checked with the placement's by :func:`~.sync.agree_groups` (a collective over each group, at
    construction)."""
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
    try:  # a failure here on some ranks only (a setting they differ in): the peers wait in the agreement below
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
    except Exception as err:  # noqa: BLE001 - told to the peers in the agreement's place (parallel.sync), re-raised
        fail_together("building the layer", err, (ep_group, tp_group), where="construction")
        raise
    common = (("num_experts", num_experts), ("num_redundant_experts", num_redundant_experts),
              ("expert_placement_strategy", strategy), ("enable_eplb", bool(enable_eplb)), *settings)
    # EP peers exchange tokens and sum partial outputs: they must hold the same slice of I (tp_rank); TP peers may
    # sit at different EP ranks (round 48's audit: EP groups {0, 3}, {1, 2} over TP groups {0, 2}, {1, 3} met each
    # other in one rank only, as checked above, and computed wrong outputs, silently)
    agree_groups([("ep_group", ep_group, (*common, ("tp_size", w_tp), ("tp_rank", group_rank(tp_group)))),
                  ("tp_group", tp_group, (*common, ("ep_size", group_size(ep_group))))])
    return placement, state
