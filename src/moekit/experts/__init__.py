"""Routed experts (consume a routing, never logits)."""

from .routed import RoutedExperts

__all__ = ["RoutedExperts"]
