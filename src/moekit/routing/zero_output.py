"""The zero-expert router's side channel (``zero_expert_output``, the seed's read-and-clear value): one value per
thread, set by ``select_experts`` and taken by the property, eagerly also while compiling."""

from __future__ import annotations

import threading

import torch


class ThreadValue(threading.local):
    """One value per thread (``value``, None until set), gone with its thread; a pickled or copied holder starts
    empty. Round 67: the side channel was a dict keyed by ``threading.get_ident()``: a new thread could read the value
    a finished thread (whose id the OS reused) left, finished threads' tensors were kept, and copies carried them."""

    value = None

    def __reduce__(self):
        return (ThreadValue, ())

    def __deepcopy__(self, memo):
        return ThreadValue()


def swap_zero_output(router, value):
    """Set ``router``'s per-thread zero-expert output to ``value``; return the one it held."""
    holder = router.zero_output_holder()
    old, holder.value = holder.value, value
    return old


#: :func:`swap_zero_output` run eagerly from compiled code (a graph break; ``fullgraph=True`` refuses it): dynamo drops
#: writes to a ``threading.local`` without a word, so a compiled ``select_experts`` left the value an earlier eager
#: call set, and a compiled read did not clear it (round 68, a regression of round 67's per-thread value)
swap_zero_output_eagerly = torch._disable_dynamo(swap_zero_output)  # (lazy: importing dynamo imports triton)
