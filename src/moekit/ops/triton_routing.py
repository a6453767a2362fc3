"""Triton routing: the Triton kernel table's ``route`` and ``hash_route`` (math in :mod:`.routing`).

    route_triton -> torch.ops.moekit.route (custom op, registered here) -> route_impl -> route_kernel

``route_triton`` returns the same ids as :func:`~moekit.ops.routing.route_torch` (ties toward the lower
expert id) and weights within fp32 rounding, for softmax / sigmoid / sqrtsoftplus scores, a selection
bias, renormalisation, ``routed_scaling_factor`` and grouped top-k. It never synchronises with the
host. NaN policy (documented in :mod:`moekit.ops._triton.topk`): NaN selection scores count as
``-inf``; the ids are always K distinct experts in ``[0, E)``; non-finite weights propagate.

Hash routing (``ids = table[input_ids]``) policy for invalid ``input_ids`` (outside ``[0, vocab)``):
an eager call raises ``ValueError`` naming the first bad id and the valid range (one host
synchronisation per call); while a CUDA graph is being captured or torch.compile traces, no host
synchronisation is possible, so such a token gets the ids of table row 0 and NaN weights: its output
turns NaN, visibly, instead of using a wrapped-around row.

Inputs are validated by the callers (:mod:`moekit.ops.api`, or a router at construction); the
functions here only check what the kernel itself cannot hold (``E`` and ``top_k`` limits).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton

from ._device import KERNEL_OPTIONS, pdl_ok
from ._eager import direct_call_ok, unit_rows
from ._triton.topk import SCORE_CODES, route_kernel
from .routing import TopKSpec, hash_route_checked

#: largest expert count one program holds in registers
MAX_EXPERTS = 4096
MAX_TOP_K = 64


def route_triton(gating_output: torch.Tensor, spec: TopKSpec, bias: torch.Tensor | None = None,
                 indices_type: torch.dtype | None = None, *,
                 logits_name: str = "router_logits") -> tuple[torch.Tensor, torch.Tensor]:
    """Score-based routing on the Triton kernel (the ``moekit::route`` custom op when traced).
    ``logits_name`` (the kernel table's signature) is unused: the kernel reads no values on the host.

    gating_output: [T, E] any float dtype; bias: [E] float or None (validated by the caller)
    returns topk_weights [T, K] float32, topk_ids [T, K] ``indices_type`` (default int32)
    """
    e = gating_output.shape[1]
    if e > MAX_EXPERTS or spec.top_k > MAX_TOP_K:  # routers refuse at construction (Kernels.check_route)
        raise NotImplementedError(f"the Triton router holds at most {MAX_EXPERTS} experts per row and top_k <= "
                                  f"{MAX_TOP_K}, got E = {e}, top_k = {spec.top_k}; choose backend='torch'")
    # the kernel reads rows with unit stride: make any view contiguous (free when it already is);
    # eagerly the launcher is called directly (no dispatcher round trip: see ._eager)
    fn = route_impl if direct_call_ok(gating_output) else route_op
    return fn(
        gating_output.contiguous(), None if bias is None else bias.contiguous(), spec.top_k, spec.scoring_func,
        bool(spec.renormalize), float(spec.routed_scaling_factor), spec.num_expert_group, spec.topk_group,
        indices_type or torch.int32,
    )


def hash_route_triton(gating_output: torch.Tensor, table: torch.Tensor, input_ids: torch.Tensor, spec: TopKSpec,
                      indices_type: torch.dtype | None = None, *, ids_name: str = "input_ids",
                      logits_name: str = "router_logits") -> tuple[torch.Tensor, torch.Tensor]:
    """Hash routing, ``ids = table[input_ids]``, weights from the unbiased scores (torch ops on the
    device); invalid ``input_ids`` follow the module's policy (``ids_name``: their name in errors;
    ``logits_name`` is unused: no value check of the logits here).

    gating_output: [T, E]; table: [V, K] integer in [0, E); input_ids: [T] integer
    returns topk_weights [T, K] float32, topk_ids [T, K] ``indices_type`` (default int32)
    """
    return hash_route_checked(gating_output, table, input_ids.reshape(-1), spec, indices_type, ids_name=ids_name)


@torch.library.custom_op("moekit::route", mutates_args=())
def route_op(
    gating_output: torch.Tensor,
    bias: Optional[torch.Tensor],
    top_k: int,
    scoring_func: str,
    renormalize: bool,
    routed_scaling_factor: float,
    num_expert_group: int,
    topk_group: int,
    ids_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.library`` op around :func:`route_impl`, so that torch.compile(fullgraph=True) traces
    through it and CUDA graphs capture it."""
    gating_output, bias = unit_rows(gating_output, bias)
    return route_impl(
        gating_output, bias, top_k, scoring_func, renormalize, routed_scaling_factor, num_expert_group,
        topk_group, ids_dtype,
    )


@route_op.register_fake
def _route_fake(gating_output, bias, top_k, scoring_func, renormalize, routed_scaling_factor, num_expert_group,
                topk_group, ids_dtype):
    t = gating_output.shape[0]
    w = gating_output.new_empty((t, top_k), dtype=torch.float32)
    return w, gating_output.new_empty((t, top_k), dtype=ids_dtype)


def route_impl(gating_output, bias, top_k, scoring_func, renormalize, scale, num_groups, topk_group, ids_dtype):
    """Launch the routing kernel (validated, contiguous inputs). On sm_90+ it lets a programmatic dependent launch
    after it begin at once (``route_kernel``'s ``TRIGGER``): the experts' input quantiser, which waits for it."""
    t, e = gating_output.shape
    w = torch.empty(t, top_k, dtype=torch.float32, device=gating_output.device)
    ids = torch.empty(t, top_k, dtype=ids_dtype, device=gating_output.device)
    if t == 0:
        return w, ids
    eg = e // num_groups
    route_kernel[(t,)](
        gating_output, bias if bias is not None else gating_output, w, ids,
        top_k, eg, num_groups, topk_group, scale,
        gating_output.stride(0), w.stride(0), ids.stride(0),
        **_route_constexprs(e, num_groups, top_k, scoring_func, bias is not None, renormalize),
        TRIGGER=pdl_ok(gating_output.device), **KERNEL_OPTIONS,
    )
    return w, ids


@functools.lru_cache(maxsize=256)
def _route_constexprs(e, num_groups, top_k, scoring_func, has_bias, renormalize) -> dict:
    """The kernel's constexpr keywords (a pure cache; the dict is never mutated). Warps by tile size; a grouped tile
    of up to 256 experts takes one (H200, ``benchmarks/route_probe.py``, round 33: DeepSeek-V3's [8, 32] tile 3.1-3.3
    µs per call with one warp, 3.5-3.6 with two, 3.7 with four; a [1, 512] tile, Kimi-K2's 384 experts in one group,
    is faster with two or four)."""
    gp, egp = triton.next_power_of_2(num_groups), triton.next_power_of_2(e // num_groups)
    one = gp * egp <= 128 or (gp > 1 and gp * egp <= 256)
    warps = 1 if one else 2 if gp * egp <= 512 else 4 if gp * egp <= 2048 else 8
    return dict(GP=gp, EGP=egp, KP=triton.next_power_of_2(top_k), SCORING=SCORE_CODES[scoring_func],
                HAS_BIAS=has_bias, GROUPED=num_groups > 1, RENORM=renormalize, num_warps=warps)
