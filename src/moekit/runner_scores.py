"""A layer's forward that also returns the routing weights it used (:meth:`moekit.MoERunner.forward_with_scores`):
what a block that returns its router scores needs (transformers' gpt-oss returns ``(hidden, router_scores)``),
with one routing instead of the forward's and a second ``select_experts`` call.

    out, weights = layer.forward_with_scores(hidden_states)        out [..., H_in], weights [T, K] float32

Eagerly on a CUDA layer with internal graphs, the route -> experts graph of T's bucket (with the gate when it is
batch invariant, as :meth:`~moekit.MoERunner.forward`'s bucket graphs hold it) returns both through its one
output: the weights' float32 bits as ``2K`` columns of the routed output's 16-bit dtype (or ``K`` float32 columns),
placed before its ``W`` columns (:func:`pack_scores`); the caller cuts them apart (:func:`unpack_scores`, one copy
each). Those graphs are keyed apart from the forward's (``tag="scores"``). Elsewhere (CPU, torch.compile,
autograd, hash routing, more tokens than the graphs take) the same ops run eagerly. Either way ``weights`` are the
bits of ``layer.router.select_experts(x, logits)[0]`` on the logits the forward routed, and ``out`` is the
forward's.
"""

from __future__ import annotations

import torch

from .runner_checks import check_hidden

_TAG = "scores"


def pack_scores(routed: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[T, W]`` routed output and ``[T, K]`` float32 weights -> ``[T, C + W]`` of the routed dtype, the weights'
    bits first (``C`` = 2K columns of a 16-bit dtype, K of float32; a float64 output takes them as values)."""
    if routed.element_size() == 2:  # (float() first: a routing function's weights in another dtype)
        w = weights.float().contiguous().view(routed.dtype)
    else:
        w = weights.to(routed.dtype)
    return torch.cat([w, routed], dim=1)


def unpack_scores(packed: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pack_scores` undone: ``(routed [T, W], weights [T, K] float32)``, each a fresh contiguous tensor
    (``packed`` may be a graph's static output, which the next replay overwrites)."""
    c = 2 * k if packed.element_size() == 2 else k
    head = packed[:, :c].contiguous()
    weights = head.view(torch.float32) if packed.element_size() == 2 else head.float()
    return packed[:, c:].contiguous(), weights


def forward_with_scores(layer, hidden_states: torch.Tensor, router_logits: torch.Tensor | None = None, *,
                        input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`moekit.MoERunner.forward_with_scores` (module docstring)."""
    graphs = layer._graphs_now() if input_ids is None else None  # (hash routing's id checks: plain calls)
    check_hidden(layer, hidden_states)
    h = hidden_states.reshape(-1, hidden_states.shape[-1])
    x = layer._routed_input(h)
    k = layer.router.top_k
    if (graphs is not None and router_logits is None
            and (layer._graph_plan or layer._make_graph_plan()).gate_in_bucket() and graphs.eligible(x, None)):
        packed = graphs(lambda xs: _packed(layer, xs, None), x, None, layer._graph_state(), copy=False, tag=_TAG)
        routed, weights = unpack_scores(packed, k)
    else:
        logits = layer._logits(h if layer.gate_input == "block" else x, router_logits)
        if graphs is not None and graphs.eligible(x, logits):
            packed = graphs(lambda xs, ls: _packed(layer, xs, ls), x, logits, layer._graph_state(), copy=False,
                            tag=_TAG)
            routed, weights = unpack_scores(packed, k)
        else:
            routed, weights = layer._route_experts(x, logits, input_ids)
    return layer._tail(hidden_states, routed, False, h), weights


def _packed(layer, x: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
    """The graphed part: (gate ->) route -> experts, the weights packed into the output."""
    if logits is None:
        logits = layer._logits(x, None)
    return pack_scores(*layer._route_experts(x, logits))
