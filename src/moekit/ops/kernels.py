"""The kernel table: one backend's kernels, resolved once per layer and handed to its router and experts.

    kernels = resolve_kernels("auto", device)     # "torch" everywhere, "triton" on CUDA
    w, ids = kernels.route(logits, spec, bias, indices_type)
    out    = kernels.experts(x, w13, w2, w, ids, activation=..., ...)

Callers validate shapes, dtypes and devices once (the public fronts in :mod:`moekit.ops.api`, or a
layer at construction and in its forward); a table's functions only compute. ``checks_values`` says
whether the table raises on non-finite logits and out-of-range ids (the torch reference does, a host
synchronisation; the Triton kernels follow the NaN policy documented in :mod:`moekit.ops._triton.topk`,
and the input_ids policy of :mod:`moekit.ops.triton_routing`).

Extension points: a quantised weight format adds keyword tensors (scales) to ``experts`` and a
``quantize`` hook; autograd adds a backward to each op. Neither changes who calls what.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from .experts import experts_reference
from .routing import hash_route_reference, route_reference

BACKENDS = ("auto", "torch", "triton")
log = logging.getLogger("moekit")


@dataclass(frozen=True)
class Kernels:
    """The ops of one backend.

    route(logits [T, E], spec: TopKSpec, bias [E] | None, indices_type) -> (w [T, K] f32, ids [T, K])
    hash_route(logits [T, E], table [V, K] int, input_ids [T] int, spec, indices_type) -> (w, ids)
    experts(x [T, H], w1, w2, topk_weights [T, K], topk_ids [T, K], *, activation,
            apply_router_weight_on_input, w1_bias, w2_bias, expert_map, swiglu_limit) -> [T, H]
    """

    name: str
    route: Callable
    hash_route: Callable
    experts: Callable
    checks_values: bool

    def __repr__(self) -> str:
        return f"Kernels({self.name!r})"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_unavailable_reason(device: torch.device) -> str | None:
    """None if the Triton kernels can run on ``device``, else why not."""
    if not triton_available():
        return "triton is not installed (pip install 'moekit[triton]')"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None  # the Triton interpreter (tests on CPU)
    return f"triton kernels need a CUDA device (or TRITON_INTERPRET=1 on CPU), got {device}"


def resolve_backend(backend: str, device, *, quiet: bool = False) -> str:
    """Return "torch" or "triton" for ``device``; an explicit backend that cannot run raises.

    backend: ``"auto"`` (Triton on CUDA when it can run, else torch), ``"torch"`` or ``"triton"``
    (``RuntimeError`` saying why when Triton cannot run on ``device``). device: a ``torch.device`` or
    string (None: CPU). quiet: do not log the choice ``"auto"`` made.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if backend == "torch":
        return "torch"
    reason = triton_unavailable_reason(device)
    if backend == "triton":
        if reason is not None:
            raise RuntimeError(f"backend='triton' cannot run: {reason}")
        return "triton"
    chosen = "triton" if reason is None and device.type == "cuda" else "torch"
    if not quiet:
        log.info("moekit: backend='auto' chose %r on %s", chosen, device)
    return chosen


def _torch_kernels() -> Kernels:
    return Kernels("torch", route=route_reference, hash_route=hash_route_reference, experts=experts_reference,
                   checks_values=True)


def _triton_kernels() -> Kernels:
    # imported here: triton is an optional dependency
    from .triton_experts import fused_experts_triton
    from .triton_routing import hash_route_triton, route_triton

    return Kernels("triton", route=route_triton, hash_route=hash_route_triton, experts=fused_experts_triton,
                   checks_values=False)


@functools.lru_cache(maxsize=None)
def kernels_for(name: str) -> Kernels:
    """The table of a resolved backend name ("torch" or "triton")."""
    if name == "torch":
        return _torch_kernels()
    if name == "triton":
        return _triton_kernels()
    raise ValueError(f"backend must be 'torch' or 'triton', got {name!r}")


def resolve_kernels(backend: str, device, *, quiet: bool = False) -> Kernels:
    """:func:`resolve_backend` then the table of that backend."""
    return kernels_for(resolve_backend(backend, device, quiet=quiet))
