"""The backward pass of the routed experts, whatever backend ran the forward: recomputation with torch.

Forward, per live slot ``j`` of token ``t`` (local expert ``e``, routing weight ``w = topk_weights[t, j]``)::

    h = W13[e] · x_t + b13[e];   a = act(h);   o = W2[e] · a + b2[e];   y_t += w · o
    (weight on the input, K == 1:   y_t = expert_e(w · x_t))

Backward, given ``dy [T, H]``: each expert's rows are recomputed and differentiated (grouped GEMMs in the layer's dtype
where ``torch._grouped_mm`` runs them, :mod:`.experts_grad_grouped`; else a float32 ``torch.func.vjp`` per expert)::

    dw[t, j] = <dy_t, o>          dx_t += W13[e]ᵀ · (act'(h) ⊙ W2[e]ᵀ · (w · dy_t))
    dW2[e] += (w · dy_t) aᵀ       dW13[e] += (act'(h) ⊙ W2[e]ᵀ (w · dy_t)) x_tᵀ       (and the biases)

Decisions: the forward's roundings (the activation rounded to ``params_dtype`` before w2, fp8's dynamic activation
quantisation) are taken as the identity (straight-through, as quantisation-aware training does); quantised weights
are dequantised to float32 per expert (:func:`moekit.ops.quantize.dequantize_weight`) and get no gradient; a slot
whose weight is exactly 0 (which the forward skips) still gets ``dw = <dy_t, o>``, the derivative of ``w · o``.
Memory: rows in chunks under ``workspace_bytes``, except that the grouped paths take larger chunks: eagerly whole
experts' rows together up to buffers of their weight gradients' bytes (at most 8 workspaces), traced up to the
weights' elements in rows (:func:`~.experts_grad_grouped.grouped_backward`, ``grouped_backward_traced``); they write
each expert's weight gradient as its GEMM made it (the layer's dtype: one rounding; an expert split over chunks is
summed in float32 first), the loop sums float32 gradients of the weights' size. Both eager paths read each expert's
row count on the host (a synchronisation per backward call); while compiling (or capturing) the grouped path sorts on
the device and runs row chunks over every expert (:func:`~.experts_grad_grouped.grouped_backward_traced`, round 59;
bf16 only: torch's tracer refuses ``_grouped_mm`` in other dtypes); elsewhere (fp16, float32, rows not 16-byte
multiples, quantised weights) every expert runs masked over every slot (``E_local`` times the FLOPs).
"""

from __future__ import annotations

from typing import Callable

import torch

from .._checks import host_sync_allowed
from .activation import apply_activation_torch
from .experts import DEFAULT_WORKSPACE_BYTES
from .experts_grad_grouped import grouped_backward, grouped_backward_traced, grouped_ok, power_of_two_chunks

#: stacks_of(e0, e1, dtype) -> (W13 [e1 - e0, 2I | I, H], W2 [e1 - e0, H, I]) of local experts e0 .. e1 - 1 in dtype
StacksOf = Callable[[int, int, torch.dtype], tuple]


def experts_backward(
    dy: torch.Tensor, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
    stacks_of: StacksOf, shapes: tuple[int, int, int, int], activation: str, swiglu_limit: float | None = None,
    on_input: bool = False, w1_bias: torch.Tensor | None = None, w2_bias: torch.Tensor | None = None,
    expert_map: torch.Tensor | None = None, need: tuple = (True, True, False, False, False, False),
    expert_chunk: int | None = None, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES, grouped: bool | None = None,
) -> tuple:
    """Gradients of the routed experts' output (module docstring).

    dy: [T, H] float, the output's gradient; x: [T, H] the forward's input; topk_weights: [T, K] float;
    topk_ids: [T, K] int; stacks_of: the weights (:data:`StacksOf`); shapes: (E_local, w13 rows, H, I);
    w1_bias: [E_local, 2I | I] or None; w2_bias: [E_local, H] or None; expert_map: [E] int (-1: held elsewhere).
    need: which of (dx, dw, dW13, dW2, db13, db2) to compute. expert_chunk: experts per ``stacks_of`` call on the
    grouped path (None: all; quantised weights: as many as the workspace holds dequantised). grouped: force the
    grouped-GEMM path on or off (None: where :func:`~.experts_grad_grouped.grouped_ok`; without host reads, only
    unquantised bf16 takes it, else the masked loop). Returns those six, None where not needed: dx [T, H] dtype of
    x; dw [T, K] dtype of topk_weights; dW13 / dW2 float32 (the loop) or the grouped GEMMs' dtype; db13 / db2
    float32.
    """
    t, k = topk_ids.shape
    num_local, rows_w13, hidden, inter = shapes
    dyf = dy.float()
    f32 = dict(dtype=torch.float32, device=x.device)
    # (the weight gradients: float32 sums on the loop path, made by the grouped paths themselves)
    outs = [torch.zeros(t, hidden, **f32) if need[0] else None, torch.zeros(t * k, **f32) if need[1] else None,
            None, None, torch.zeros(num_local, rows_w13, **f32) if need[4] and w1_bias is not None else None,
            torch.zeros(num_local, hidden, **f32) if need[5] and w2_bias is not None else None]
    ids = topk_ids.reshape(-1).long()
    local = ids
    if expert_map is not None:  # an id outside the map (-1, >= E) is dead, as in the forward (round 62: -1 read the
        # map's last entry, the gradients of a dead slot went to that expert; >= E raised IndexError)
        emap = expert_map.long()
        local = torch.where((ids >= 0) & (ids < emap.shape[0]), emap[ids.clamp(0, max(emap.shape[0] - 1, 0))], -1)
    # dead: -1 and, without a map, any id past the local experts (round 62: a bincount as long as the largest id)
    key = torch.where((local >= 0) & (local < num_local), local, torch.full_like(local, num_local))
    weights = topk_weights.reshape(-1).float()
    eager = host_sync_allowed()  # compiling or capturing: no host reads
    if grouped is None:
        grouped = grouped_ok(x.device, x.dtype, (hidden, inter, rows_w13))
    if grouped and not eager and not (expert_chunk is None and x.dtype == torch.bfloat16):
        grouped = False  # compiling / capturing: the traced grouped path takes unquantised bf16 only (all experts'
        # stacks at once; torch's tracer refuses _grouped_mm in other dtypes, also on CPU): else the masked loop
    if t == 0 or not grouped:
        outs[2:4] = [torch.zeros(num_local, rows_w13, hidden, **f32) if need[2] else None,
                     torch.zeros(num_local, hidden, inter, **f32) if need[3] else None]
    if t == 0:
        return _results(outs, need, x, topk_weights, t, k)
    if grouped and not eager:
        w13, w2 = stacks_of(0, num_local, x.dtype)
        grouped_backward_traced(dyf, x, weights, key, k, w13, w2, w1_bias, w2_bias, activation, swiglu_limit,
                                on_input, need, outs, x.dtype, workspace_bytes)
        return _results(outs, need, x, topk_weights, t, k)
    order = counts = None
    if eager:  # live slots sorted by local expert (dead ones last), each expert's row count on the host
        order = torch.argsort(key, stable=True)
        counts_dev = torch.bincount(key, minlength=num_local + 1)[:num_local]
        counts = counts_dev.tolist()
    if grouped:
        grouped_backward(dyf, x, weights, order, key[order], counts, counts_dev, k, stacks_of, w1_bias, w2_bias,
                         activation, swiglu_limit, on_input, need, outs, x.dtype, workspace_bytes,
                         expert_chunk or num_local)
        return _results(outs, need, x, topk_weights, t, k)
    for e, slots_e, mask in _expert_slots(key, num_local, order, counts):
        w13, w2 = (w[0] for w in stacks_of(e, e + 1, torch.float32))
        rows = max(1, workspace_bytes // (4 * (3 * w13.shape[0] + 4 * hidden + inter)))
        # eagerly this expert's slots in chunks under the workspace bound; compiling: every slot, masked, in
        # power-of-two chunks under the same bound (round 62: one chunk of all T·K rows, unbounded)
        for slots, m in _chunks(slots_e, mask, rows):
            g = _expert_grads(dyf, x, weights, slots, k, w13, w2, w1_bias, w2_bias, e, activation, swiglu_limit,
                              on_input, need, m)
            if need[0]:
                outs[0].index_add_(0, slots // k, g[0])
            if need[1]:
                outs[1].index_add_(0, slots, g[1])
            for i in range(2, 6):
                if g[i] is not None:
                    outs[i][e] += g[i]
    return _results(outs, need, x, topk_weights, t, k)


def _results(outs, need, x, topk_weights, t: int, k: int) -> tuple:
    """(dx in x's dtype, dw [T, K] in topk_weights' dtype, the weight / bias gradients), None where not needed."""
    return (outs[0].to(x.dtype) if need[0] else None, outs[1].view(t, k).to(topk_weights.dtype) if need[1] else None,
            *outs[2:])


def _chunks(slots: torch.Tensor, mask: torch.Tensor | None, rows: int):
    """Yields ``(slots, mask)`` parts of at most ``rows`` slots: in order where ``mask`` is None (eager: the expert's
    own slots), else :func:`~.experts_grad_grouped.power_of_two_chunks` of every slot, padded with masked-off slot 0
    (compiling or capturing: no host read, a guard per power-of-two band)."""
    if mask is None:
        for lo in range(0, slots.shape[0], rows):
            yield slots[lo:lo + rows], None
        return
    n = slots.shape[0]
    chunks, size = power_of_two_chunks(n, rows)
    if chunks > 1:
        pad = chunks * size - n
        slots, mask = torch.cat([slots, slots.new_zeros(pad)]), torch.cat([mask, mask.new_zeros(pad)])
    for i in range(chunks):
        yield slots[i * size:(i + 1) * size], mask[i * size:(i + 1) * size]


def _expert_slots(key: torch.Tensor, num_local: int, order: torch.Tensor | None, counts: list[int] | None):
    """Yields ``(e, slots [n] int64, mask [n] bool | None)`` per local expert (``key``: [T·K] the local expert of each
    slot, ``num_local`` for dead ones). With ``order`` / ``counts`` (the slots sorted by ``key``, each expert's row
    count): the expert's slots, experts without one skipped. Without (compiling or capturing: no host reads): every
    slot with a mask of the expert's (``E_local`` times the FLOPs, as the torch twin's compiled forward)."""
    if order is None:
        every = torch.arange(key.shape[0], device=key.device)
        for e in range(num_local):
            yield e, every, key == e
        return
    begin = 0
    for e, n in enumerate(counts):
        if n:
            yield e, order[begin:begin + n], None
        begin += n


def _expert_grads(dyf, x, weights, slots, k, w13, w2, b1, b2, e, activation, limit, on_input, need, mask) -> tuple:
    """One expert's gradients over ``slots`` (flat slot indices [n]; ``mask`` [n] bool: the slots that are this
    expert's, None: all): (dx rows [n, H] f32, dw [n] f32, dW13, dW2, db13, db2 of expert ``e`` or None).
    A ``torch.func.vjp`` of the float32 expert (dynamo traces it, unlike ``torch.autograd.grad``: compiled training)."""
    tok = slots // k
    inputs = [x[tok].float(), weights[slots], w13.float(), w2.float(),
              b1[e].float() if b1 is not None else None, b2[e].float() if b2 is not None else None]
    wanted = [i for i in range(6) if need[i] and inputs[i] is not None]

    def expert(*primals):
        xe, we, w1e, w2e, b1e, b2e = (primals[wanted.index(i)] if i in wanted else t for i, t in enumerate(inputs))
        h = (xe * we.unsqueeze(1) if on_input else xe) @ w1e.t()
        if b1e is not None:
            h = h + b1e
        o = apply_activation_torch(h, activation, limit) @ w2e.t()
        if b2e is not None:
            o = o + b2e
        out = o if on_input else o * we.unsqueeze(1)
        if mask is not None:
            out = torch.where(mask.unsqueeze(1), out, torch.zeros((), dtype=out.dtype, device=out.device))
        return out

    if not wanted:
        return (None,) * 6
    _, pull = torch.func.vjp(expert, *(inputs[i] for i in wanted))
    got = dict(zip(wanted, pull(dyf[tok])))
    return tuple(got.get(i) for i in range(6))
