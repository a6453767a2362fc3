"""Routed experts: ``out[t] = Σ_j w[t, j] · expert_{ids[t, j]}(x[t])``.

``expert_e(x) = w2[e] · act(w13[e] · x + b13[e]) + b2[e]`` where ``w13[e]`` holds the gate rows then the
up rows (``2I`` rows; ``I`` rows for the non-gated relu2). With ``apply_router_weight_on_input``
(``K == 1`` only) the weight scales the input instead: ``out[t] = expert_{ids[t, 0]}(w[t, 0] · x[t])``.
``expert_map [E] int32`` maps global ids to local ids, ``-1`` for experts held elsewhere (they add 0).

:func:`check_experts_inputs` is the one argument check (run by the public front
:func:`moekit.ops.api.fused_experts` and by :func:`fused_experts_torch`); :func:`experts_reference` is the
torch kernel table's function (it checks values: ids and ``expert_map`` in range, host synchronisations).
This module never imports Triton code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import (
    FLOAT_DTYPES,
    check_bool,
    check_float_dtype,
    check_int,
    check_int_dtype,
    check_same_device,
    check_shape,
    check_tensor,
    host_sync_allowed,
    values_checkable,
)
from ._eager import autocast_off, rounded
from .activation import acc_dtype, apply_activation_torch, check_swiglu_limit, get_activation

#: Upper bound on the reference path's per-chunk scratch memory (bytes).
DEFAULT_WORKSPACE_BYTES = 256 * 1024 * 1024


def chunk_tokens(total: int, most: int) -> int:
    """Tokens per chunk when ``total`` tokens run in chunks of at most ``most``: the fewest chunks that
    bound allows, of equal size (the last one shorter by less than the number of chunks).

    Each chunk streams every expert's weights once, so a short last chunk costs a full chunk's weight
    traffic on little work; equal chunks keep each one in the regime of the whole call. H200, DeepSeek-V3
    fp8 block, T = 16384 under the Triton path's 4 GiB bound: 13740 + 2644 tokens -> 8192 + 8192.
    """
    most = max(1, min(total, most))
    chunks = -(-total // most)
    return max(1, -(-total // chunks))


def compiled_chunks(run, most: int, x: torch.Tensor, *rows: torch.Tensor) -> torch.Tensor:
    """The dense loops' chunks (torch.compile, a CUDA graph capture): ``run(x, *rows)`` (``[Tc, ...]`` each ->
    ``[Tc, W]``) in one call for T <= ``most`` tokens, else in n chunks of ceil(T / n) <= ``most`` tokens, n the power
    of two with n/2 · most < T <= n · most; the inputs are padded by fewer than n rows of zeros (zero tokens of
    weight 0 routed to id 0: rows independent of the real ones, computed (the weight-on-input path and the output norm
    run them) and cut from the output). A symbolic T is guarded only against those bounds: one graph per power of two.
    (A loop ``range(0, T, chunk)`` guarded on T itself: a graph per T, and a fullgraph compile failed at the 9th T.)"""
    t = x.shape[0]
    if t <= most:
        return run(x, *rows)
    n = 2
    while n * most < t:
        n *= 2
    size = (t + n - 1) // n
    parts = [torch.nn.functional.pad(v, (0, 0, 0, n * size - t)).view(n, size, v.shape[1]) for v in (x, *rows)]
    return torch.cat([run(*(v[i] for v in parts)) for i in range(n)])[:t]


@dataclass(frozen=True)
class ExpertsProblem:
    """Validated sizes of one ``fused_experts`` call."""

    num_tokens: int  # T
    hidden: int  # H
    inter: int  # I
    top_k: int  # K
    num_local: int  # E_local
    num_global: int  # E (the id space of topk_ids)
    activation: str  # canonical name

    @classmethod
    def of(cls, hidden_states, w2, topk_ids, expert_map, activation: str) -> "ExpertsProblem":
        """Sizes read off (already checked) tensors."""
        t, h = hidden_states.shape
        e_local, _, inter = w2.shape
        num_global = expert_map.shape[0] if expert_map is not None else e_local
        return cls(t, h, inter, topk_ids.shape[1], e_local, num_global, activation)


def check_experts_inputs(
    hidden_states, w1, w2, topk_weights, topk_ids, *, activation: str = "silu",
    apply_router_weight_on_input: bool = False, w1_bias=None, w2_bias=None, expert_map=None,
    global_num_experts: int = -1, swiglu_limit: float | None = None,
) -> ExpertsProblem:
    """Check shapes, dtypes and devices of a ``fused_experts`` call (no values read); return its sizes."""
    act = get_activation(activation)
    check_swiglu_limit(act.name, swiglu_limit)
    check_bool("apply_router_weight_on_input", apply_router_weight_on_input)
    for name, t in (("hidden_states", hidden_states), ("w1", w1), ("w2", w2)):
        check_tensor(name, t)
        check_float_dtype(name, t, FLOAT_DTYPES)
    check_tensor("topk_weights", topk_weights)
    check_tensor("topk_ids", topk_ids)
    if hidden_states.dim() != 2:
        raise ValueError(f"hidden_states must have shape [T, H], got {list(hidden_states.shape)}")
    t, h = hidden_states.shape
    if w1.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"w1 must be [E, 2I|I, H] and w2 [E, H, I], got {list(w1.shape)} and {list(w2.shape)}")
    _check_not_swapped(w1, w2, h, act.gated)
    if w2.shape[1] != h:  # w2 sets E and I below: a wrong w2 must not be reported as a wrong w1
        if w1.shape[2] == w2.shape[1]:
            raise ValueError(f"hidden_states has width H = {h} but w1 {list(w1.shape)} and w2 {list(w2.shape)} "
                             f"hold H = {w2.shape[1]}")
        raise ValueError(f"w2 must have shape [E, H={h}, I] (H: hidden_states' width), got {list(w2.shape)}")
    e_local, _, inter = w2.shape
    if min(e_local, h, inter) < 1:  # (round 64: the Triton path returned uninitialised memory for I = 0)
        raise ValueError(f"w2 must have shape [E, H, I] with E, H and I >= 1, got {list(w2.shape)}")
    rows = 2 * inter if act.gated else inter
    if w1.shape[2] == h and tuple(w1.shape) != (e_local, rows, h):  # E or I disagree: either may be the wrong one
        per = 2 if act.gated else 1
        other = f" or w2 shape [{w1.shape[0]}, {h}, {w1.shape[1] // per}]" if w1.shape[1] % per == 0 else ""
        raise ValueError(
            f"w1 {list(w1.shape)} and w2 {list(w2.shape)} disagree on E or I: w1 must be [E, {'2I' if per == 2 else 'I'},"
            f" H] and w2 [E, H, I] (activation {act.name!r}); so w1 must have shape {[e_local, rows, h]}{other}")
    check_shape("w1", w1, (e_local, rows, h))
    check_shape("w2", w2, (e_local, h, inter))
    for name, t_ in (("w1", w1), ("w2", w2)):
        if t_.dtype != hidden_states.dtype:
            raise TypeError(f"{name} has dtype {t_.dtype} but hidden_states has {hidden_states.dtype}; they must match")
        check_same_device(name, t_, "hidden_states", hidden_states)
    if topk_ids.dim() != 2 or topk_ids.shape[0] != t or topk_ids.shape[1] < 1:
        raise ValueError(f"topk_ids must have shape [T={t}, K] with K >= 1, got {list(topk_ids.shape)}")
    k = topk_ids.shape[1]
    check_shape("topk_weights", topk_weights, (t, k))
    check_int_dtype("topk_ids", topk_ids)
    if not topk_weights.is_floating_point():
        raise TypeError(f"topk_weights must be a float tensor, got {topk_weights.dtype}")
    check_same_device("topk_ids", topk_ids, "hidden_states", hidden_states)
    check_same_device("topk_weights", topk_weights, "hidden_states", hidden_states)
    if apply_router_weight_on_input and k != 1:
        raise ValueError(f"apply_router_weight_on_input=True requires top_k == 1, got top_k={k}")
    biases = (("w1_bias", w1_bias, w1, (e_local, rows)), ("w2_bias", w2_bias, w2, (e_local, h)))
    for name, bias, weight, shape in biases:
        if bias is None:
            continue
        check_tensor(name, bias)
        check_shape(name, bias, shape)
        if bias.dtype != weight.dtype:
            raise TypeError(f"{name} has dtype {bias.dtype} but the expert weights are {weight.dtype}; they must match")
        check_same_device(name, bias, "hidden_states", hidden_states)
    if expert_map is not None:
        check_tensor("expert_map", expert_map)
        check_int_dtype("expert_map", expert_map)
        if expert_map.dim() != 1:
            raise ValueError(f"expert_map must have shape [E], got {list(expert_map.shape)}")
        check_same_device("expert_map", expert_map, "hidden_states", hidden_states)
    p = ExpertsProblem.of(hidden_states, w2, topk_ids, expert_map, act.name)
    if global_num_experts not in (-1, None) and global_num_experts != p.num_global:
        if expert_map is not None:
            raise ValueError(f"global_num_experts ({global_num_experts}) must equal len(expert_map) ({p.num_global})")
        raise ValueError(
            f"global_num_experts ({global_num_experts}) differs from w1.shape[0] ({e_local}); pass expert_map"
        )
    return p


def _check_not_swapped(w1, w2, h: int, gated: bool) -> None:
    """w1 [E, H, I] with w2 [E, 2I, H] (or [E, I, H] non-gated) is the w13/w2 pair swapped: say so."""
    inter = w1.shape[2]
    rows = 2 * inter if gated else inter
    if w1.shape[0] == w2.shape[0] and tuple(w1.shape[1:]) == (h, inter) and tuple(w2.shape[1:]) == (rows, h) \
            and (rows, h) != (h, inter):
        raise ValueError(
            f"w1 has shape {list(w1.shape)} and w2 {list(w2.shape)}; expected w1 [E, {'2I' if gated else 'I'}, H] = "
            f"{[w1.shape[0], rows, h]} and w2 [E, H, I] = {[w1.shape[0], h, inter]}: did you swap w1 and w2?"
        )


def check_expert_map_range(expert_map: torch.Tensor | None, num_local: int) -> None:
    """``expert_map`` values lie in ``[-1, num_local)`` (a host sync; skipped where values cannot be read:
    compiling, capturing, fake tensors)."""
    if expert_map is not None and expert_map.numel() and values_checkable(expert_map):
        lo, hi = int(expert_map.min()), int(expert_map.max())
        if lo < -1 or hi >= num_local:
            raise ValueError(f"expert_map values must lie in [-1, {num_local}) (local slots), got [{lo}, {hi}]")


def check_ids_in_range(topk_ids: torch.Tensor, num_experts: int, expert_map: torch.Tensor | None = None) -> None:
    """Raise if an id lies outside ``[0, num_experts)`` (a host synchronisation; skipped while compiling,
    capturing a CUDA graph or on the meta device, as :func:`moekit._checks.check_finite`). ``expert_map``: the
    call's map when ``num_experts`` is its length (the message then says where the bound comes from)."""
    if topk_ids.numel() == 0 or not values_checkable(topk_ids):
        return
    lo, hi = int(topk_ids.min()), int(topk_ids.max())
    if lo < 0 or hi >= num_experts:
        src = " (the length of expert_map: global expert ids)" if expert_map is not None else ""
        raise ValueError(f"topk_ids must lie in [0, {num_experts}){src}, got values in [{lo}, {hi}]")


def fused_experts_torch(
    hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
    topk_ids: torch.Tensor, *, activation: str = "silu", apply_router_weight_on_input: bool = False,
    w1_bias: torch.Tensor | None = None, w2_bias: torch.Tensor | None = None,
    expert_map: torch.Tensor | None = None, global_num_experts: int = -1, swiglu_limit: float | None = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> torch.Tensor:
    """The torch twin of :func:`moekit.fused_experts` as a public function (any device, float64 allowed):
    :func:`check_experts_inputs`, then :func:`experts_reference`.

    hidden_states, w1, w2, topk_weights, topk_ids, activation, apply_router_weight_on_input, w1_bias,
    w2_bias, expert_map, global_num_experts, swiglu_limit: as in :func:`moekit.fused_experts`.
    workspace_bytes: the bound on scratch memory; large batches run in chunks under it (exact: every
    token lies in one chunk). Returns ``[T, H]`` in the dtype of ``hidden_states``.
    """
    p = check_experts_inputs(
        hidden_states, w1, w2, topk_weights, topk_ids, activation=activation,
        apply_router_weight_on_input=apply_router_weight_on_input, w1_bias=w1_bias, w2_bias=w2_bias,
        expert_map=expert_map, global_num_experts=global_num_experts, swiglu_limit=swiglu_limit,
    )
    check_int("workspace_bytes", workspace_bytes, minimum=1)
    return experts_reference(
        hidden_states, w1, w2, topk_weights, topk_ids, activation=p.activation,
        apply_router_weight_on_input=apply_router_weight_on_input, w1_bias=w1_bias, w2_bias=w2_bias,
        expert_map=expert_map, swiglu_limit=swiglu_limit, workspace_bytes=workspace_bytes,
    )


@autocast_off  # (the GEMMs in the weights' dtype under torch.autocast too: round 68)
def experts_reference(
    x, w1, w2, topk_weights, topk_ids, *, activation="silu", apply_router_weight_on_input=False,
    w1_bias=None, w2_bias=None, expert_map=None, swiglu_limit=None, workspace_bytes=DEFAULT_WORKSPACE_BYTES,
) -> torch.Tensor:
    """Reference routed experts (the torch kernel table's ``experts``): vectorised over tokens, a loop
    over experts, bounded memory. Arguments are checked already; the values of ``topk_ids`` and
    ``expert_map`` are checked here (host synchronisations).

    x: [T, H]; w1: [E_local, 2I | I, H]; w2: [E_local, H, I]; topk_weights: [T, K] float;
    topk_ids: [T, K] int in [0, E); w1_bias: [E_local, 2I | I]; w2_bias: [E_local, H];
    expert_map: [E] int in [-1, E_local). returns: [T, H] dtype of x.

    Precision: GEMMs in the input dtype (fp32 accumulation, the product rounded to it where the kernels keep fp32;
    fp16 ones in fp32, whose fp16 products could overflow), the w13 bias added in fp32, the activation in fp32 then
    rounded to the input dtype, the weighting and the top-k sum in fp32, one final rounding.
    Slots with weight exactly 0 (masked zero experts) are skipped on the output-weighted path: they
    add exactly 0 for finite expert outputs. The top-k sum runs in slot order, so a token's output
    does not depend on the rest of the batch's routing. Tokens run in chunks sized so that the
    scratch stays under ``workspace_bytes``; each token lies in one chunk, so chunking changes a row only through
    the CPU GEMMs' blocking (round 63: bf16 rows of a hot expert, 488 vs 16384 rows in one GEMM, 1 ulp apart).

    Under ``torch.compile`` (decision, issue #12): the eager loop needs each expert's token count on the
    host (data-dependent shapes, a graph break), so while compiling each chunk runs the dense,
    trace-friendly formulation :func:`_experts_chunk_dense` instead -- every local expert over every
    token of the chunk, the result kept only in the slots routed to it. It computes the same slot
    values with the same precision steps and sums the slots in the same order, so it matches eager up
    to GEMM blocking; it costs ``E_local`` times the FLOPs, acceptable for the reference backend (fast
    compiled layers use the Triton backend). The value checks are skipped while compiling. The same holds while a CUDA
    graph is captured (:func:`~moekit._checks.host_sync_allowed`), which refuses the eager loop's host reads.
    """
    p = ExpertsProblem.of(x, w2, topk_ids, expert_map, get_activation(activation).name)
    check_ids_in_range(topk_ids, p.num_global, expert_map)
    check_expert_map_range(expert_map, p.num_local)
    if p.num_tokens == 0:
        return torch.empty_like(x)
    # scratch per token: its K slot outputs [H] f32 (kept for the top-k sum), and per row of one expert's call the
    # gathered input [H], then the larger of the activation phase (h [2I], its f32 upcast, the gate / up temporaries)
    # and the output phase (o [H], its bias sum, the activation [I]), f32 (float64: twice); one expert's call holds
    # a token at most ``repeats`` times (round 63: a token's slots on one expert, repeated ids, reached 1.9x the old
    # count; any router gives distinct ids: once)
    acc = acc_dtype(x.dtype).itemsize
    per_row = (4 * p.hidden + 6 * p.inter) * acc  # one row of one expert's call
    per_token = p.top_k * (acc * p.hidden + 16) + per_row
    local_map = expert_map.long() if expert_map is not None else None
    # compiling or capturing a CUDA graph: the eager loop's host reads are refused; meta tensors hold no values to
    # read (round 64: a meta layer's forward raised "item() cannot be called on meta tensors")
    if not host_sync_allowed() or x.device.type == "meta":
        dense = p.top_k * (2 * p.hidden + 3 * p.inter) * 4 + p.top_k * 16  # (the dense chunks' count, as before)
        most = max(1, workspace_bytes // (dense + (2 * p.inter + p.hidden) * 4))
        # one guard (T <= most), not T itself: one graph serves every T up to the bound; above it, one per power of two
        # of the chunk count (the chunk loop below specialises on T: fullgraph compiles hit the recompile limit)
        return compiled_chunks(lambda xc, wc, ic: _experts_chunk_dense(
            xc, w1, w2, wc, ic, p, apply_router_weight_on_input, w1_bias, w2_bias, local_map, swiglu_limit),
            most, x, topk_weights, topk_ids)
    out = torch.empty_like(x)
    per_token += (_repeats(topk_ids) - 1) * per_row
    chunk = chunk_tokens(p.num_tokens, workspace_bytes // per_token)
    for start in range(0, p.num_tokens, chunk):
        stop = min(start + chunk, p.num_tokens)
        out[start:stop] = _experts_chunk(
            x[start:stop], w1, w2, topk_weights[start:stop], topk_ids[start:stop], p,
            apply_router_weight_on_input, w1_bias, w2_bias, local_map, swiglu_limit,
        )
    return out


def _repeats(topk_ids) -> int:
    """At most how many of one token's slots name one expert (an upper bound: 1 + its repeated ids; 1 for K = 1 and
    for every router, whose ids are distinct). One host read."""
    if topk_ids.shape[1] == 1:
        return 1
    ids = topk_ids.sort(dim=1).values
    return 1 + int((ids[:, 1:] == ids[:, :-1]).sum(1).max())


def _live_slots(topk_weights, topk_ids, local_map, on_input, dtype):
    """(flat slot weights [Tc·K] f32 (f64 for a float64 ``dtype``, the activations'), local expert per slot [Tc·K]
    int64, live mask [Tc·K] bool)."""
    ids = topk_ids.reshape(-1).long()
    weights = topk_weights.reshape(-1).to(acc_dtype(dtype))
    local = local_map[ids] if local_map is not None else ids
    live = local >= 0
    if not on_input:
        live &= weights != 0
    return weights, local, live


def _expert_rows(xin, w1, w2, b1, b2, e: int, p, swiglu_limit, dtype) -> torch.Tensor:
    """``expert_e(xin)`` in float32: xin [N, H] dtype -> [N, H] f32 (precision as the module says).

    fp16 runs both GEMMs and the biases in float32 (round 49): their fp16 products overflowed where the kernels'
    fp32 accumulators do not (a gate pre-activation of -1e5 rounded to -inf, then silu gave NaN; an unweighted
    expert output of 1.6e5 became inf before its 0.25 weight). bf16 shares float32's range: its GEMMs stay in bf16
    (fp32 accumulation, one rounding of the product), which keeps a row's bits the same in batches of moderate size
    on the CPU (float32 CPU GEMMs not even there: their blocking follows the row count; SPEC §9 asks the torch path
    for agreement within the tolerances, bits of the Triton path only); the w13 bias is added in fp32 to the rounded
    product and the activation reads that sum unrounded, as the kernels' fp32 accumulator (round 64: a bf16 add rounded
    h twice, 1.6e-2 relative RMS from the float64 math on small decode shapes with biases, past SPEC §4's 1e-2); the
    w2 bias is added in the input dtype (one rounding of the fp32 sum)."""
    up = (lambda t: t.float()) if dtype == torch.float16 else (lambda t: t)  # fp16: every operand in fp32
    acc = acc_dtype(dtype)
    h = up(xin) @ up(w1[e]).t()
    if b1 is not None:
        h = h.to(acc) + b1[e].to(acc)
    a = rounded(apply_activation_torch(h, p.activation, swiglu_limit), dtype)  # (fp16: kept under compile)
    del h  # (freed before the output's buffers: the scratch bound counts the larger phase only)
    o = up(a) @ up(w2[e]).t()
    if b2 is not None:  # (in the input dtype: one rounding of the fp32 sum, the bits the all-to-all EP path's
        o = o + up(b2[e])  # experts return before their fp32 weighting, so it stays bit-exact: docs/parallel.md)
    return o.to(acc_dtype(o.dtype))  # (float64 stays: round 63, the float64 oracle computed in float32)


def _experts_chunk_dense(x, w1, w2, topk_weights, topk_ids, p, on_input, b1, b2, local_map, swiglu_limit):
    """The compile-friendly chunk (no data-dependent shapes): x [Tc, H] -> [Tc, H]."""
    tc, k = topk_ids.shape
    weights, local, live = _live_slots(topk_weights, topk_ids, local_map, on_input, x.dtype)
    # with the input weighting K == 1, so slot t is token t; otherwise every slot of a token sees x[t]
    rows = rounded(x.to(acc_dtype(x.dtype)) * weights.unsqueeze(1), x.dtype) if on_input else x
    slot_out = torch.zeros(tc * k, p.hidden, dtype=acc_dtype(x.dtype), device=x.device)
    for e in range(p.num_local):
        o = _expert_rows(rows, w1, w2, b1, b2, e, p, swiglu_limit, x.dtype)
        if not on_input:
            o = (o.unsqueeze(1) * weights.view(tc, k, 1)).reshape(tc * k, p.hidden)
        slot_out = torch.where((live & (local == e)).unsqueeze(1), o, slot_out)
    return rounded(slot_out.view(tc, k, p.hidden).sum(dim=1), x.dtype)


def _experts_chunk(x, w1, w2, topk_weights, topk_ids, p, on_input, b1, b2, local_map, swiglu_limit):
    """One chunk of tokens: x [Tc, H] -> [Tc, H]."""
    tc, k = topk_ids.shape
    weights, local, live = _live_slots(topk_weights, topk_ids, local_map, on_input, x.dtype)
    # sort slots by local expert; dead slots get key E_local and sort last
    key = torch.where(live, local, torch.full_like(local, p.num_local))
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=p.num_local + 1)[: p.num_local].tolist()
    slot_out = torch.zeros(tc * k, p.hidden, dtype=acc_dtype(x.dtype), device=x.device)
    begin = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        slots = order[begin : begin + n]
        begin += n
        xin = x[slots // k]
        if on_input:
            xin = rounded(xin.to(acc_dtype(x.dtype)) * weights[slots].unsqueeze(1), x.dtype)
        o = _expert_rows(xin, w1, w2, b1, b2, e, p, swiglu_limit, x.dtype)
        del xin
        if not on_input:  # (in place where no gradient is traced: one [n, H] f32 buffer less at the peak)
            w = weights[slots].unsqueeze(1)
            o = o * w if torch.is_grad_enabled() and (o.requires_grad or w.requires_grad) else o.mul_(w)
        slot_out[slots] = o
    return rounded(slot_out.view(tc, k, p.hidden).sum(dim=1), x.dtype)
