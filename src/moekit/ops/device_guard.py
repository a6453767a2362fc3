"""A call on a CUDA tensor of another device than the current one runs with that device made current.

Triton launches a kernel on the CURRENT device's current stream (``triton.runtime.jit`` asks the driver for the current
device), not on its arguments' device; CUDA streams, events and graph captures made without a device are the current
device's too. Round 69: a layer on cuda:1 called while cuda:0 was current (transformers' ``device_map`` runs a model
spread over GPUs that way: it never changes the current device) launched its kernels in cuda:0's context with cuda:1
pointers (Triton's "Pointer argument cannot be accessed from Triton"), or, with peer access on, on cuda:0's stream,
unordered with the cuda:1 stream that wrote their inputs (a silently wrong output).

The entry points make the input's device current around the call: the layer's ``forward`` / ``forward_with_scores``
(:func:`moekit.parallel.agree.agreed_forward`) and ``compute_router_logits``, a router's ``forward`` /
``select_experts``, the public ops' Triton calls (:mod:`moekit.ops.api`), the benchmark and tuning helpers (their
``device`` argument, :mod:`moekit.benchmarking.timer`). The kernel table's functions and the modules a layer calls
(``RoutedExperts``, ``RouterLinear``) do not check again: they run on the device their caller made current (called
directly on another device than the current one, they need ``with torch.cuda.device(...)`` around them).

The decision, per call (:func:`other_device`): ``x.is_cuda`` (a CPU tensor stops there: nothing of ``torch.cuda`` is
touched), then ``x.get_device()`` against ``torch.cuda.current_device()``, an int compare. (``current_device`` rather
than the raw ``torch._C._cuda_getDevice``, a few tens of ns cheaper: torch.compile constant-folds the former, with a
guard, and would put the latter in the graph.)
"""

from __future__ import annotations

from typing import Callable

import torch


def other_device(x) -> bool:
    """``x`` is a CUDA tensor of another device than the current one (False for anything else, a non-tensor too)."""
    return isinstance(x, torch.Tensor) and x.is_cuda and x.get_device() != torch.cuda.current_device()


def call_on_device(x, fn: Callable, /, *args, **kwargs):
    """``fn(*args, **kwargs)``, with ``x``'s CUDA device current when it is another than the current one."""
    if other_device(x):
        with torch.cuda.device(x.get_device()):
            return fn(*args, **kwargs)
    return fn(*args, **kwargs)
