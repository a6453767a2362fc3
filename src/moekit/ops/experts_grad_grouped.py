"""The routed experts' backward (:mod:`moekit.ops.experts_grad`) as grouped GEMMs: a few launches for every expert.

Live slots sorted by local expert, in chunks of rows under the workspace bound; per chunk, with ``offs`` the ends of
each expert's rows (``torch._grouped_mm``, one GEMM over all experts)::

    A  = x[tok] (· w on the input)          h = A · W13ᵀ + b13        a = act(h)        o = a · W2ᵀ + b2
    do = w · dy[tok] (dy[tok] on the input)  da = do · W2               dh = act'(h)ᵀ da   dA = dh · W13
    dw = <dy[tok], o> (<dA, x[tok]> on the input)   dx[tok] += dA (· w on the input)
    dW2[e] += doᵀ a,  dW13[e] += dhᵀ A  (grouped along the rows),  db13 / db2: row sums per expert

GEMM operands and outputs are in the layer's dtype (bf16 / fp32; float32 accumulation; fp16 takes the float32 loop of
:mod:`.experts_grad`), the activation and its derivative in float32. Quantised weights are dequantised to that dtype
a group of experts at a time (under the workspace bound).
"""

from __future__ import annotations

import bisect

import torch

from .activation import apply_activation_torch

_GMM = getattr(torch, "_grouped_mm", None)


def grouped_ok(device: torch.device, dtype: torch.dtype, widths: tuple[int, ...]) -> bool:
    """Whether ``torch._grouped_mm`` runs these GEMMs: it exists, the dtype runs there (CPU: float32 / bf16;
    CUDA: bf16, sm_90 and later) and every operand's row stride (``widths``: H, I, the w13 rows) is a multiple of
    16 bytes, as it requires."""
    if _GMM is None:
        return False
    # (not fp16: its GEMM outputs overflow where the forward's float32 ones do not; the float32 loop takes it)
    dtypes = (torch.bfloat16,) if device.type == "cuda" else (torch.float32, torch.bfloat16)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        return False
    size = torch.empty((), dtype=dtype).element_size()
    return dtype in dtypes and all(w * size % 16 == 0 for w in widths)


def grouped_backward(dyf, x, weights, order, sorted_key, counts, counts_dev, k, stacks_of, b1, b2, activation, limit,
                     on_input, need, outs, dtype, workspace_bytes, expert_chunk):
    """Adds every live slot's gradients into ``outs`` = [dx [T, H] f32, dw [T·K] f32, db13, db2 (f32 or None)] at
    0, 1, 4, 5 and sets outs[2] / outs[3] (dW13 / dW2 where ``need`` them) to ``[E_local, ...]`` stacks in ``dtype``.
    order: [T·K] slots sorted by local expert (dead slots last); sorted_key: [T·K] their local experts; counts /
    counts_dev: rows per local expert (a host list / the same on the device); stacks_of(e0, e1, dtype) -> (W13 [n,
    rows, H], W2 [n, H, I]); expert_chunk: experts per ``stacks_of`` call.

    Rows go in groups of whole consecutive experts (:func:`_groups`), so each expert's weight gradient is one grouped
    GEMM's output in ``dtype`` (round 60: every chunk's were added into float32 stacks, read, written and cast again:
    most of a training step's time on a GPU), the stacks themselves where one group holds every expert, else copied
    into them; an expert with more rows than a group holds is split and summed in float32 (rounded once). Nothing in
    the loop reads the device or copies host data to it (each would drain the stream: round 60's profile): the
    offsets and experts of a group are slices of device tensors, the experts without rows are zeroed by one index
    tensor made before any GEMM is queued."""
    num_local = len(counts)
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)  # host: the first sorted row of each local expert (and the end)
    ends = torch.cumsum(counts_dev, 0)
    idle = [e for e, c in enumerate(counts) if c == 0] if need[2] or need[3] else []
    idle_dev = torch.tensor(idle, dtype=torch.int64, device=x.device)  # (before any GEMM is queued)
    grads = [None, None]
    for g0 in range(0, num_local, expert_chunk):
        g1 = min(num_local, g0 + expert_chunk)
        if starts[g1] == starts[g0] and not (need[2] or need[3]):
            continue  # (no rows, no weight gradient: quantised weights are not dequantised for nothing)
        w13, w2 = stacks_of(g0, g1, dtype)
        # whole experts together up to buffers of the weight gradients' bytes, at most GROUP_WORKSPACES workspaces
        # (round 61: bounded by the largest expert's rows instead, a group held about one expert, each group's
        # gradients then copied into the stacks: 16-21 % of a patched step's GPU time in an H100 profile)
        ws_rows = workspace_bytes // _row_bytes(w13, w2)
        rows = max(1, ws_rows, min(_grad_rows(w13, w2), GROUP_WORKSPACES * ws_rows))
        split = [None, None]  # a split expert's float32 sums
        for e0, e1, lo, hi in _groups(starts, g0, g1, rows):
            zero = idle_dev[bisect.bisect_left(idle, e0):bisect.bisect_left(idle, e1)] - e0  # its experts without rows
            if lo == hi:
                _put(grads, [torch.zeros((e1 - e0, *w.shape[1:]), dtype=dtype, device=x.device) if need[2 + i]
                             else None for i, w in enumerate((w13, w2))], e0, e1, num_local)
                continue
            offs = (ends[e0:e1] - lo).clamp_(0, hi - lo).to(torch.int32)
            parts = _chunk(dyf, x, weights, order[lo:hi], sorted_key[lo:hi], offs, k, w13[e0 - g0:e1 - g0],
                           w2[e0 - g0:e1 - g0], b1, b2, activation, limit, on_input, need, outs, dtype, empty=zero)
            if lo == starts[e0] and hi == starts[e1]:  # whole experts
                _put(grads, parts, e0, e1, num_local)
                del parts  # (copied, or the stacks themselves: not held while the next group's buffers are made)
                continue
            for i, part in enumerate(parts):
                if part is not None:
                    split[i] = part.float() if split[i] is None else split[i].add_(part)
            if hi == starts[e1]:  # the split expert's last rows
                _put(grads, [None if t is None else t.to(dtype) for t in split], e0, e1, num_local)
                split = [None, None]
    outs[2], outs[3] = grads


def _put(grads: list, parts, e0: int, e1: int, num_local: int) -> None:
    """Experts ``e0 .. e1 - 1``'s weight gradients into ``grads`` (made on first use): the parts themselves where they
    are every expert's, else copied in."""
    for i, part in enumerate(parts):
        if part is None:
            continue
        if e0 == 0 and e1 == num_local:
            grads[i] = part
            continue
        if grads[i] is None:
            grads[i] = part.new_empty((num_local, *part.shape[1:]))
        grads[i][e0:e1].copy_(part)


def _groups(starts: list[int], g0: int, g1: int, rows: int):
    """Yields ``(e0, e1, lo, hi)``: experts ``e0 .. e1 - 1`` of ``g0 .. g1 - 1``, sorted rows ``lo .. hi - 1``; whole
    consecutive experts of at most ``rows`` rows together (those without rows included), an expert of more rows alone
    in parts of at most ``rows`` (``e1 = e0 + 1``, the part's rows)."""
    e = g0
    while e < g1:
        if starts[e + 1] - starts[e] > rows:
            for lo in range(starts[e], starts[e + 1], rows):
                yield e, e + 1, lo, min(lo + rows, starts[e + 1])
            e += 1
            continue
        e1 = e + 1
        while e1 < g1 and starts[e1 + 1] - starts[e] <= rows:
            e1 += 1
        yield e, e1, starts[e], starts[e1]
        e = e1


def grouped_backward_traced(dyf, x, weights, key, k, w13, w2, b1, b2, activation, limit, on_input, need, outs,
                            dtype, workspace_bytes):
    """:func:`grouped_backward` without a host read (compiling or capturing; round 59: before, every expert ran masked
    over every slot, E_local times the FLOPs): the slots sorted by local expert on the device, dead ones (``key`` ==
    E_local: held elsewhere) in the last expert's rows with a zero output gradient (``live``); an expert without rows
    in a chunk masked, as eagerly. ``key``: [T·K] int64 local expert of each slot; w13 / w2: every local expert's
    stack in ``dtype`` (unquantised weights: views, no copy).

    Chunks (as the forward's :func:`~.experts.compiled_chunks`): the N = T·K rows in one for N <= ``rows``, else in n
    of ceil(N / n) <= ``rows`` rows, n the power of two with n/2 · rows < N <= n · rows, padded with dead rows; a
    symbolic N is guarded only against those bounds (one graph for N <= ``rows``, one more per power-of-two band above
    it; a loop over N itself would guard on N: a graph per T). ``rows``: the workspace bound, but at least as many rows
    as make a chunk's weight-gradient outputs (every expert's, ``[E, 2I, H]`` and ``[E, H, I]``) no larger than its
    row buffers, so a chunk's buffers may exceed ``workspace_bytes`` (a Mixtral-8x7B-sized layer: ~30k rows)."""
    num_local = w13.shape[0]
    live = key < num_local
    key = key.clamp(max=num_local - 1)
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(num_local, dtype=torch.int64, device=key.device).index_add_(0, key, torch.ones_like(key))
    expert, live = key[order], live[order]
    n = key.shape[0]
    rows = max(1, workspace_bytes // _row_bytes(w13, w2), _weight_rows(w13, w2))
    chunks, size = power_of_two_chunks(n, rows)
    if chunks > 1:
        pad = chunks * size - n  # dead rows (slot 0, no gradient) at the end: the last expert's
        order = torch.cat([order, order.new_zeros(pad)])
        expert = torch.cat([expert, expert.new_full((pad,), num_local - 1)])
        live = torch.cat([live, live.new_zeros(pad)])
        counts[num_local - 1] += pad  # (a scalar into a device tensor: no host copy, capture-safe)
    ends = torch.cumsum(counts, 0)  # (counts by index_add_, not bincount: its length is data-dependent to a tracer)
    for i in range(chunks):
        lo, hi = i * size, (i + 1) * size
        offs = (ends - lo).clamp(0, size).to(torch.int32)
        parts = _chunk(dyf, x, weights, order[lo:hi], expert[lo:hi], offs, k, w13, w2, b1, b2, activation, limit,
                       on_input, need, outs, dtype, live[lo:hi])
        for j, part in enumerate(parts):  # one chunk: the weight gradients as the GEMMs wrote them; else summed in f32
            if part is not None:
                outs[2 + j] = part if chunks == 1 else (part.float() if i == 0 else outs[2 + j].add_(part))


def power_of_two_chunks(n, rows: int) -> tuple[int, int]:
    """(chunks, rows per chunk) for ``n`` rows (a symbolic int while tracing) under a bound of ``rows``: (1, n) for
    n <= rows, else n / chunks <= rows rows each with ``chunks`` the power of two with chunks/2 · rows < n <= chunks ·
    rows (the caller pads to chunks · size): a trace guards on those bands only, not on n itself."""
    if n <= rows:
        return 1, n
    chunks = 2
    while chunks * rows < n:
        chunks *= 2
    return chunks, (n + chunks - 1) // chunks


#: an eager group's row buffers: at most this many workspaces (2 GiB at the default 256 MiB; round 61's review: bounded
#: by the weight gradients' bytes alone, a DeepSeek-V3 layer's group took 21 GiB of buffers at T = 16384)
GROUP_WORKSPACES = 8


def _grad_rows(w13, w2) -> int:
    """Rows whose buffers (:func:`_row_bytes`) take as many bytes as the weight gradients (in the weights' dtype): an
    eager group's bound beside the workspace's (round 60: whole experts together, the weight gradients written once,
    without a copy where one group holds every expert)."""
    return (w13.numel() + w2.numel()) * w13.element_size() // _row_bytes(w13, w2)


def _weight_rows(w13, w2) -> int:
    """Rows whose elements (``(2I | I) + H + I`` each) are as many as the weights': a chunk of that many rows costs
    buffers of about the size of the weight gradients it makes."""
    return (w13.numel() + w2.numel()) // (w13.shape[1] + w13.shape[2] + w2.shape[2])


def _row_bytes(w13, w2) -> int:
    """The float32 buffers one sorted row costs a chunk (h / act / dh / their casts, the row's input and gradients)."""
    return 4 * (4 * w13.shape[1] + 4 * w13.shape[2] + 3 * w2.shape[2])


def _chunk(dyf, x, weights, slots, expert, offs, k, w13, w2, b1, b2, activation, limit, on_input, need, outs, dtype,
           live=None, empty=None) -> tuple:
    """One chunk of sorted rows (``live``: [rows] bool, the rows whose output gradient counts; None: all): adds dx,
    dw, db13, db2 into ``outs``; returns (dW13, dW2) of its experts (``[n, ...]`` in ``dtype``; 0 for an expert
    without rows here: ``empty``, an int64 device tensor of those, or None: found on the device, a pass over the
    outputs), None where not needed."""
    tok = slots // k
    w = weights[slots].unsqueeze(1)
    xs = x[tok]
    a_in = (xs.float() * w).to(dtype) if on_input else xs.to(dtype)
    h = _GMM(a_in, w13.transpose(1, 2), offs=offs).float()
    if b1 is not None:
        h = h + b1[expert].float()
    act, pull = torch.func.vjp(lambda t: apply_activation_torch(t, activation, limit), h)
    g = dyf[tok] if live is None else dyf[tok] * live.unsqueeze(1)
    g_c = g.to(dtype)
    do = g if on_input else g * w  # (the output rows' gradient: db2, and dW2 below)
    # W2ᵀ·dy once per row (round 60: the weight's gradient <dy, o> = <W2ᵀ·dy, a> + <dy, b2> from it, not from a
    # recomputed o = W2·a: one grouped GEMM less), then scaled by the routing weight for dh
    ga = _GMM(g_c, w2, offs=offs).float()
    if need[1] and not on_input:
        dw = (ga * act).sum(1)
        if b2 is not None:
            dw += (g * b2[expert].float()).sum(1)
        outs[1].index_add_(0, slots, dw)
    dh = pull(ga if on_input else ga * w)[0]
    dh_c = dh.to(dtype)
    if need[0] or (need[1] and on_input):
        da = _GMM(dh_c, w13, offs=offs).float()
        if need[1] and on_input:
            outs[1].index_add_(0, slots, (da * xs.float()).sum(1))
        if need[0]:
            outs[0].index_add_(0, tok, da * w if on_input else da)
    if need[4] and b1 is not None:
        outs[4].index_add_(0, expert, dh)
    if need[5] and b2 is not None:
        outs[5].index_add_(0, expert, do)
    if not (need[2] or need[3]):
        return None, None
    parts = (_GMM(dh_c.t(), a_in, offs=offs) if need[2] else None,
             _GMM((g_c if on_input else do.to(dtype)).t(), act.to(dtype), offs=offs) if need[3] else None)
    # an expert without rows: the K-grouped GEMMs do not write its block (CUDA)
    mask = (torch.diff(offs, prepend=offs.new_zeros(1)) == 0)[:, None, None] if empty is None else None
    for part in parts:
        if part is not None and mask is not None:
            part.masked_fill_(mask, 0.0)
        elif part is not None and empty.numel():
            part.index_fill_(0, empty, 0.0)
    return parts
