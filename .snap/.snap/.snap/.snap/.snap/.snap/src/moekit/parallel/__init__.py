"""Scale-out: placement, EPLB (pure functions) and dispatch/combine over torch.distributed.

See docs/parallel.md. ``FusedMoE(..., ep_group=, tp_group=, enable_eplb=, num_redundant_experts=)``
builds the pieces; :func:`rebalance` applies EPLB to many layers.
"""

from .dispatch import DISPATCH_MODES, AllGatherDispatcher, AllToAllDispatcher, compute_layout
from .eplb import (
    assign_slots,
    balanced_packing,
    balancing_policy,
    hierarchical_redundancy_bound,
    imbalance,
    plan_weight_moves,
    rank_loads,
    rebalance_experts,
    replicate_experts,
)
from .eplb_state import EplbState, replica_hash
from .executor import ParallelExecutor
from ..experts.placement import PLACEMENT_STRATEGIES, ExpertPlacement, initial_physical_to_logical, local_physical_ids
from .rebalance import rebalance, rebalance_layer
from .sync import PeerFailed

__all__ = [
    "AllGatherDispatcher",
    "AllToAllDispatcher",
    "DISPATCH_MODES",
    "EplbState",
    "ExpertPlacement",
    "PLACEMENT_STRATEGIES",
    "ParallelExecutor",
    "PeerFailed",
    "assign_slots",
    "balanced_packing",
    "balancing_policy",
    "compute_layout",
    "hierarchical_redundancy_bound",
    "imbalance",
    "initial_physical_to_logical",
    "local_physical_ids",
    "plan_weight_moves",
    "rank_loads",
    "rebalance",
    "rebalance_experts",
    "rebalance_layer",
    "replica_hash",
    "replicate_experts",
]
