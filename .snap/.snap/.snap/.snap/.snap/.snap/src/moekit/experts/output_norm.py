"""Expert output norms (Muse Spark's one norm, Ergo's norm per expert) around any experts call:

    out[t] = Σ_k w[t, k] · norm_e(expert_e(x[t])),   e = ids[t, k]

The kernels sum a token's slots in the w2 epilogue, and the norm needs each slot's own row first. So the experts
run once per slot with weight 1 on the token rows repeated K times ``[T·K, H]`` (one slot per row: each row is
that expert's output, rounded to the dtype as any output is; ids this rank does not hold give zero rows, which the
norm must map to zero), the norm runs on those rows, then the weights and the sum over k follow in float32 in slot
order; a slot of weight exactly 0 adds 0 (masked zero experts, padding). Every backend and weight format runs it.
"""

from __future__ import annotations

from typing import Callable

import torch

from .._checks import check_callable
from ..ops.experts import compiled_chunks

#: bytes of slot rows (and their float32 copies) one chunk of tokens holds
NORM_WORKSPACE_BYTES = 1024**3


def check_output_norm(norm, moe_config, placement) -> None:
    """A layer with an expert output norm: not with the router weight on the input (``ValueError``) or tensor
    parallelism (``NotImplementedError``)."""
    if norm is None:
        return
    check_callable("expert_output_norm", norm)
    if moe_config.apply_router_weight_on_input:
        raise ValueError("expert_output_norm cannot be combined with apply_router_weight_on_input=True: the norm "
                         "of a weighted input's expert output is not the weighted norm of the expert output")
    if placement.tp_size > 1:
        raise NotImplementedError(f"expert_output_norm with tensor parallelism (tp_size={placement.tp_size}): a "
                                  "rank's expert output rows are partial sums over its slice of I, and the norm of "
                                  "a partial sum is not a part of the norm; use expert parallelism (ep_group)")


def norm_ids_map(placement, norm, device, current: torch.Tensor | None = None) -> torch.Tensor | None:
    """The ids a per-expert norm (``norm.per_expert``) indexes by: physical -> logical ``[E + R]`` int64 when
    they differ (redundant experts, EPLB moves), else None. ``current`` is updated in place when its shape
    fits (whatever reads it by address sees the move)."""
    p2l = placement.physical_to_logical
    if norm is None or not getattr(norm, "per_expert", False) or p2l == tuple(range(len(p2l))):
        return None
    new = torch.tensor(p2l, dtype=torch.int64, device=device)
    if current is not None and current.shape == new.shape:
        return current.copy_(new)
    return new


def normed_experts(run: Callable, norm, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                   p2l: torch.Tensor | None = None) -> torch.Tensor:
    """The module formula. run(rows [N, H], weights [N, 1] f32, ids [N, 1]) -> [N, H] is the experts call;
    x: [T, H]; topk_weights: [T, K] float; topk_ids: [T, K] int; p2l: :func:`norm_ids_map`'s map or
    None. Tokens run in chunks of :data:`NORM_WORKSPACE_BYTES` of slot rows (each token in one chunk;
    batch-invariant kernels give the same bits whatever the chunk). returns [T, H] dtype of x."""
    t, k = topk_ids.shape
    h = x.shape[-1]
    per_expert = getattr(norm, "per_expert", False)

    def one(xc, wc, ic):  # a chunk of tokens -> [Tc, H]
        ids = ic.reshape(-1, 1)
        rows = xc.repeat_interleave(k, dim=0) if k > 1 else xc
        y = run(rows, torch.ones(ids.shape, dtype=torch.float32, device=x.device), ids)
        if per_expert:
            flat = ids.reshape(-1).long()
            y = norm(y, flat if p2l is None else p2l[flat])
        else:
            y = norm(y)
        w = wc.float().unsqueeze(-1)
        slots = (y.float().reshape(xc.shape[0], k, h) * w).masked_fill_(w == 0, 0.0)
        return slots.sum(dim=1).to(x.dtype)

    chunk = max(1, NORM_WORKSPACE_BYTES // (k * h * (2 * x.element_size() + 12)))
    if t <= chunk or torch.compiler.is_compiling():  # one call (no copy into `out`); compiling: guards on T <= chunk
        return compiled_chunks(one, chunk, x, topk_weights, topk_ids)  # and powers of two above it, not on T itself
    out = torch.empty_like(x)
    for start in range(0, t, chunk):
        stop = min(start + chunk, t)
        out[start:stop] = one(x[start:stop], topk_weights[start:stop], topk_ids[start:stop])
    return out
