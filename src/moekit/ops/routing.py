"""Routing: scores -> (optionally grouped, optionally biased) top-k -> weights; torch twins and input checks.

One contract, :class:`TopKSpec`, covers every score-based router. This module holds the torch twins
(:func:`route_torch`, :func:`hash_route_torch`), the torch kernel-table functions that also check values
(:func:`route_reference`, :func:`hash_route_reference`) and the argument checks the public fronts of
:mod:`moekit.ops.api` run once. It never imports Triton code.

Math (``s = scores(logits)`` in float32, ``b`` the optional selection bias)::

    sel   = s + b                       (selection scores; weights always come from unbiased s)
    if G > 1:  group_score[g] = top2sum(sel[g]) if b is given else max(sel[g])
               keep the topk_group best groups, experts of other groups -> -inf
    ids   = topk(sel, K)                ties -> lower expert id (documented argmax semantics)
    w     = s[ids]; if renormalize: w /= sum(w); w *= routed_scaling_factor

Output: ``topk_weights [T, K] float32`` and ``topk_ids [T, K] int32`` (or ``indices_type``), each row
in descending order of selection score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import (  # noqa: F401  (host_sync_allowed: re-exported, its home is _checks)
    check_bool, check_choice, check_finite, check_int, check_real, check_same_device, check_shape, check_tensor,
    host_sync_allowed, values_checkable,
)

SCORING_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus")


@dataclass(frozen=True)
class TopKSpec:
    """Everything a score-based top-k router computes, minus the tensors.

    top_k: ``K``; scoring_func: ``"softmax"``, ``"sigmoid"`` or ``"sqrtsoftplus"``; renormalize: divide
    the top-k weights by their sum; routed_scaling_factor: multiplies the weights last;
    num_expert_group: ``G`` (``1`` means ungrouped); topk_group: groups kept per token.
    Validate with :meth:`validate` against ``E``.
    """

    top_k: int
    scoring_func: str = "softmax"
    renormalize: bool = False
    routed_scaling_factor: float = 1.0
    num_expert_group: int = 1
    topk_group: int = 1

    def validate(self, num_experts: int, *, top_k_name: str = "top_k") -> "TopKSpec":
        """Check every field against ``E = num_experts``; errors call ``top_k`` ``top_k_name`` (the public
        functions' ``topk``: SPEC §7, errors name the argument as the caller passes it)."""
        check_int(top_k_name, self.top_k, minimum=1)
        check_choice("scoring_func", self.scoring_func, SCORING_FUNCS)
        check_bool("renormalize", self.renormalize)
        check_real("routed_scaling_factor", self.routed_scaling_factor, positive=True, float32=True)
        if self.top_k > num_experts:
            raise ValueError(f"{top_k_name} must be <= the number of experts ({num_experts}), got {self.top_k}")
        g, kg = self.num_expert_group, self.topk_group
        check_int("num_expert_group", g, minimum=1)
        check_int("topk_group", kg, minimum=1)
        if g > num_experts:
            raise ValueError(f"num_expert_group must be <= the number of experts ({num_experts}), got {g}")
        if num_experts % g:
            raise ValueError(f"num_expert_group ({g}) must divide the number of experts ({num_experts})")
        if kg > g:
            raise ValueError(f"topk_group must be <= num_expert_group ({g}), got {kg}")
        kept = kg * (num_experts // g)
        if self.top_k > kept:
            raise ValueError(
                f"{top_k_name} ({self.top_k}) must be <= the experts in the kept groups "
                f"(topk_group {kg} x {num_experts // g} experts per group = {kept})"
            )
        return self

    @property
    def grouped(self) -> bool:
        return self.num_expert_group > 1


def compute_scores(logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """scores: [T, E] float32 from logits [T, E] (any float dtype)."""
    x = logits.float()
    if scoring_func == "softmax":
        return torch.softmax(x, dim=-1)
    # not torch.sigmoid / F.softplus: on CPU their vector loop and scalar tail differ by an ulp, so equal
    # logits got scores depending on their memory position and ties did not go to the lowest id
    if scoring_func == "sigmoid":  # e^-|x|: 1 / (1 + e^-x) overflowed below x = -88.7 (every score 0); -|x| as a
        z = torch.exp(torch.where(x >= 0, -x, x))  # where (round 63: abs has gradient 0 at 0, so d/dx was 0 there)
        return torch.where(x >= 0, (z + 1.0).reciprocal_(), z / (z + 1.0))
    if scoring_func == "sqrtsoftplus":  # softplus(x) = x above 20, as F.softplus
        return torch.where(x > 20.0, x, torch.log1p(torch.exp(x))).sqrt_()
    raise ValueError(f"scoring_func must be one of {list(SCORING_FUNCS)}, got {scoring_func!r}")


def topk_lowest_id(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim, descending, ties broken toward the lower index on every device.

    Built from ``argmax``, which documents that it returns the first maximal index.
    values: [T, N] float; returns (vals [T, k], idx [T, k] int64).
    """
    work = values.clone()
    idx = torch.empty(values.shape[:-1] + (k,), dtype=torch.int64, device=values.device)
    for j in range(k):
        best = work.argmax(dim=-1, keepdim=True)
        idx[..., j : j + 1] = best
        work.scatter_(-1, best, float("-inf"))
    return values.gather(-1, idx), idx


def _group_mask(sel: torch.Tensor, spec: TopKSpec, biased: bool) -> torch.Tensor:
    """Boolean [T, E]: True for experts in the ``topk_group`` best groups."""
    t, e = sel.shape
    grouped = sel.view(t, spec.num_expert_group, e // spec.num_expert_group)
    if biased and grouped.shape[-1] >= 2:
        group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)  # values only: ties cannot matter
    else:  # unbiased: max; a one-expert group scores as that expert
        group_score = grouped.amax(dim=-1)
    _, keep = topk_lowest_id(group_score, spec.topk_group)
    mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
    return mask.unsqueeze(-1).expand_as(grouped).reshape(t, e)


def finish_weights(weights: torch.Tensor, renormalize: bool, scale: float) -> torch.Tensor:
    """Renormalise then scale float32 weights [T, K]."""
    if renormalize:
        total = weights.sum(dim=-1, keepdim=True)
        # only an all-zero top-k (scores that underflowed to 0) is guarded, against 0 / 0: it stays 0. Round 46: a
        # clamp of the sum at 1e-20 had renormalised tiny selected scores (a bias-picked softmax score of e^-50,
        # sigmoid scores of logits near -50) to weights summing to far less than 1
        weights = weights / torch.where(total > 0, total, torch.ones_like(total))
    if scale != 1.0:
        weights = weights * scale
    return weights


def route_torch(
    gating_output: torch.Tensor,
    spec: TopKSpec,
    bias: torch.Tensor | None = None,
    indices_type: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of every score-based router (see module docstring).

    gating_output: [T, E] any float dtype
    bias: [E] any float dtype or None
    returns topk_weights [T, K] float32, topk_ids [T, K] ``indices_type`` (default int32)
    """
    scores = compute_scores(gating_output, spec.scoring_func)
    sel = scores if bias is None else scores + bias.float().unsqueeze(0)
    if spec.grouped:
        sel = sel.masked_fill(~_group_mask(sel, spec, bias is not None), float("-inf"))
    _, ids = topk_lowest_id(sel, spec.top_k)
    weights = finish_weights(scores.gather(1, ids), spec.renormalize, spec.routed_scaling_factor)
    return weights, ids.to(indices_type or torch.int32)


def hash_route_torch(
    gating_output: torch.Tensor,
    hash_ids: torch.Tensor,
    spec: TopKSpec,
    indices_type: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hash routing with the ids given: ``w = finish(scores[hash_ids])`` (unbiased scores).

    gating_output: [T, E] any float dtype; hash_ids: [T, K] integer in [0, E)
    returns topk_weights [T, K] float32, topk_ids [T, K] ``indices_type`` (default int32)
    """
    ids = hash_ids.long()
    scores = compute_scores(gating_output, spec.scoring_func)
    weights = finish_weights(scores.gather(1, ids), spec.renormalize, spec.routed_scaling_factor)
    return weights, ids.to(indices_type or torch.int32)


def hash_route_masked(gating_output, table, input_ids, spec: TopKSpec, indices_type=None):
    """Hash routing where the ids cannot be checked on the host (compiling, capturing): a token whose ``input_ids``
    entry is outside the table's rows takes row 0's ids, one whose table row holds an id outside ``[0, E)`` takes
    ids 0, and both get NaN weights (visible in the output) instead of a wrapped-around row or an out-of-bounds
    gather (round 63: the torch path read row -1, the last, silently). input_ids: [T] integer."""
    vocab, e = table.shape[0], gating_output.shape[1]
    bad = (input_ids < 0) | (input_ids >= vocab)
    picked = table[input_ids.long().masked_fill(bad, 0)].long()
    off_table = ((picked < 0) | (picked >= e)).any(1, keepdim=True)
    w, ids = hash_route_torch(gating_output, picked.masked_fill(off_table, 0), spec, indices_type)
    return w.masked_fill(bad.unsqueeze(1) | off_table, float("nan")), ids


def hash_route_checked(gating_output, table, input_ids, spec: TopKSpec, indices_type=None, *,
                       ids_name: str = "input_ids"):
    """Hash routing, both tables' path: with host reads allowed, ``input_ids`` against the table's rows and the rows
    they pick against ``[0, E)`` (``ValueError``; round 63: a table changed in place after its checks reached the
    gather), else :func:`hash_route_masked`. input_ids: [T] integer."""
    if not host_sync_allowed():
        return hash_route_masked(gating_output, table, input_ids, spec, indices_type)
    vocab, e = table.shape[0], gating_output.shape[1]
    picked = table[input_ids.long().clamp(0, vocab - 1)]
    if input_ids.numel():  # one host read for both ranges (the table's other values are checked where it is given)
        lo, hi, low, high = torch.stack([*torch.aminmax(input_ids.long()), *torch.aminmax(picked.long())]).tolist()
        _check_ids_span(ids_name, lo, hi, vocab)
        if low < 0 or high >= e:
            raise ValueError(f"hash_indices_table values must lie in [0, {e}), got [{low}, {high}] in the rows "
                             f"these {ids_name} pick")
    return hash_route_torch(gating_output, picked, spec, indices_type)


# -- the torch kernel table's functions: inputs validated by the caller; values checked here -------------

#: what a router's non-finite logits may come from (round 67: a NaN in hidden_states blamed logits never passed)
LOGITS_HINT = " (the logits given to the layer, or its gate's output: non-finite hidden_states give these)"


def route_reference(gating_output, spec: TopKSpec, bias, indices_type, *, logits_name: str = "router_logits"):
    """:func:`route_torch` after checking that the logits and the selection bias are finite (host
    synchronisations: a NaN bias would otherwise win every top-k here, as ``argmax`` ranks NaN first;
    ``logits_name``: the logits' name in errors, ``gating_output`` from the public functions)."""
    check_finite(logits_name, gating_output, LOGITS_HINT if logits_name == "router_logits" else "")
    if bias is not None:
        check_finite("e_score_correction_bias", bias)
    return route_torch(gating_output, spec, bias, indices_type)


def hash_route_reference(gating_output, table, input_ids, spec: TopKSpec, indices_type, *, ids_name="input_ids",
                         logits_name="router_logits"):
    """Hash routing, ``ids = table[input_ids]``, after checking ``input_ids`` against the table's rows
    and the logits for finiteness (host synchronisations; ``ids_name``, ``logits_name``: their names in errors).

    gating_output: [T, E]; table: [V, K] integer; input_ids: [T] integer
    """
    check_finite(logits_name, gating_output, LOGITS_HINT if logits_name == "router_logits" else "")  # (not on meta)
    return hash_route_checked(gating_output, table, input_ids.reshape(-1), spec, indices_type, ids_name=ids_name)


# -- argument checks (the public fronts run them once per call; routers at construction) ----------------

def check_gating(gating_output, num_tokens: int | None = None, num_experts: int | None = None, *,
                 name: str = "router_logits") -> torch.Tensor:
    """Logits ``[T, E]``, a float tensor (with ``num_tokens`` / ``num_experts``: that many rows / columns);
    errors call them ``name`` (the routers' ``router_logits``, the public functions' ``gating_output``)."""
    check_tensor(name, gating_output)
    if gating_output.dim() != 2:
        raise ValueError(f"{name} must have shape [T, E], got {list(gating_output.shape)}")
    if not gating_output.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got {gating_output.dtype}")
    if num_tokens is not None and gating_output.shape[0] != num_tokens:
        raise ValueError(f"{name} must have {num_tokens} rows (one per token), got {gating_output.shape[0]}")
    if num_experts is not None and gating_output.shape[1] != num_experts:
        raise ValueError(f"{name} must have {num_experts} columns (one per expert), got {gating_output.shape[1]}")
    return gating_output


def check_bias(bias, num_experts: int, name: str = "e_score_correction_bias") -> torch.Tensor:
    check_tensor(name, bias)
    check_shape(name, bias, (num_experts,))
    if not bias.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got {bias.dtype}")
    return bias


#: the id dtypes a router may return: a narrower one (int16, int8, uint8) would wrap ids past its range into
#: valid-looking wrong experts; torch.uint32 (vLLM's kernels take it) has no comparison or indexing kernels in torch,
#: so ids in it could be neither checked nor used here (decided round 64: refused, the message says so)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_indices_type(indices_type) -> None:
    if indices_type is not None and indices_type not in INDEX_DTYPES:
        why = ("torch has no comparison or indexing kernels for uint32; cast the int32 ids where a kernel wants "
               "uint32" if indices_type == torch.uint32 else "a narrower integer type would wrap expert ids")
        raise TypeError(f"indices_type must be torch.int32, torch.int64 or None, got {indices_type!r} ({why})")


def check_hash_table(table, num_experts: int, top_k: int, check_range: bool = True, *,
                     top_k_name: str = "top_k") -> torch.Tensor:
    """Shape and dtype checks; with ``check_range`` also the id range (a host sync: reference path; skipped for a
    table on the meta device, which holds no values); ``top_k_name``: the caller's name of ``top_k`` in errors."""
    check_tensor("hash_indices_table", table)
    if table.dim() != 2 or table.shape[1] != top_k or table.shape[0] == 0:
        raise ValueError(f"hash_indices_table must have shape [vocab >= 1, {top_k_name}={top_k}], "
                         f"got {list(table.shape)}")
    if table.is_floating_point() or table.is_complex() or table.dtype == torch.bool:
        raise TypeError(f"hash_indices_table must be an integer tensor (not bool: every id would be 0 or 1), "
                        f"got {table.dtype}")
    if check_range and table.numel() and values_checkable(table) and \
            (int(table.min()) < 0 or int(table.max()) >= num_experts):
        raise ValueError(
            f"hash_indices_table values must lie in [0, {num_experts}), got range "
            f"[{int(table.min())}, {int(table.max())}]"
        )
    return table


def check_input_ids(input_ids, table: torch.Tensor, num_tokens: int, name: str = "input_ids") -> torch.Tensor:
    """Argument checks of hash routing's ``input_ids`` (no values read; errors call it ``name``: ``fused_topk_bias``
    names it ``input_tokens``); returns them flat, ``[T]``."""
    if input_ids is None:
        raise ValueError(f"{name} is required for hash routing (hash_indices_table is set), got None")
    check_tensor(name, input_ids)
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {input_ids.dtype}")
    input_ids = input_ids.reshape(-1)
    if input_ids.shape[0] != num_tokens:
        raise ValueError(f"{name} must hold one id per token ({num_tokens}), got {input_ids.shape[0]}")
    check_same_device(name, input_ids, "hash_indices_table", table)
    return input_ids


def _check_ids_span(name: str, lo: int, hi: int, vocab: int) -> None:
    """``ValueError`` naming the first bad id when ids spanning ``[lo, hi]`` leave ``[0, vocab)`` (the rows of
    ``hash_indices_table``)."""
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} must lie in [0, {vocab}) (rows of hash_indices_table), got {bad} "
                         f"(values span [{lo}, {hi}])")


def grouped_spec(topk, renormalize, num_expert_group, topk_group, scoring_func, routed_scaling_factor) -> TopKSpec:
    """TopKSpec for grouped routing; ``num_expert_group``/``topk_group`` must be given (>= 1)."""
    for name, v in (("num_expert_group", num_expert_group), ("topk_group", topk_group)):
        if v is None or isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int for grouped top-k routing, got {v!r}")
    return TopKSpec(
        top_k=topk,
        scoring_func=scoring_func,
        renormalize=renormalize,
        routed_scaling_factor=routed_scaling_factor,
        num_expert_group=num_expert_group,
        topk_group=topk_group,
    )
