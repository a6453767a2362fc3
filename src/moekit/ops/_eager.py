"""When a Triton launcher may skip its ``torch.library`` custom op (the eager host-time fast path).

A custom op call costs a dispatcher round trip (boxing every argument, an aliasing check on the
result): measured ~40 µs per call on a slow CPU host, against ~3 µs for calling the Python launcher
directly (``benchmarks/host_overhead_cpu.py``). Both run the same launcher, so the output is the same
bit for bit; the op stays the path that torch.compile / torch.export trace, that fake tensors and
dispatch modes see, and that ``torch.library.opcheck`` tests.
"""

from __future__ import annotations

import torch

_dispatch_depth = getattr(torch._C, "_len_torch_dispatch_stack", None)


def direct_call_ok(t: torch.Tensor) -> bool:
    """True for plain eager execution: not tracing (``torch.compiler.is_compiling()``), ``t`` a plain
    ``torch.Tensor`` (not a fake or other subclass) and no ``TorchDispatchMode`` active."""
    if torch.compiler.is_compiling() or type(t) is not torch.Tensor:
        return False
    return _dispatch_depth is not None and _dispatch_depth() == 0  # unknown torch: the op, always


def unit_rows(*tensors):
    """Each tensor (or None) with a unit last-dimension stride (``contiguous()``; the same tensor when it already is):
    the kernels index rows as ``base + row · stride(0) + col``. The custom ops' bodies call it, so a direct
    ``torch.ops.moekit.*`` call with a transposed view is right, not read with the wrong strides (round 54)."""
    return tuple(t if t is None or t.is_contiguous() else t.contiguous() for t in tensors)
