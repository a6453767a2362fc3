"""Routed experts (consume a routing, never logits): weights, their placement and layout, checkpoint
names, and the local executor."""

from .executor import LocalExecutor
from .placement import ExpertPlacement
from .routed import RoutedExperts

__all__ = ["ExpertPlacement", "LocalExecutor", "RoutedExperts"]
