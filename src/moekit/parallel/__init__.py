"""Scale-out: placement, EPLB (pure functions) and dispatch/combine over torch.distributed."""

from .placement import PLACEMENT_STRATEGIES, ExpertPlacement, local_physical_ids

__all__ = ["ExpertPlacement", "PLACEMENT_STRATEGIES", "local_physical_ids"]
