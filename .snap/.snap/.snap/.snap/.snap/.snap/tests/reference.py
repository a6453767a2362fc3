"""Naive float64 references for the moekit core (SPEC §1-§3), written independently of moekit.

Everything here is a per-token (and per-slot) Python loop over float64 tensors: slow, obvious, and
sharing no code with ``moekit``. Tests compare moekit against these.

- :func:`ref_route`: softmax / sigmoid / sqrtsoftplus scores, optional selection bias, optional expert
  groups (group score = top-2 sum with a bias, max without; a one-expert group scores as its expert),
  top-k with ties toward the lower id, weights from the unbiased scores, renormalise, then scale.
  Also returns ``margin``: the smallest gap between neighbouring ranked values that decided the ids,
  so a test can assert its input is tie-free (float32 and float64 then agree on the ids).
- :func:`ref_hash_route`, :func:`ref_zero_expert_route`, :func:`ref_llama4_routing`: the other kinds.
- :func:`ref_act`, :func:`ref_expert`, :func:`ref_experts`: ``expert_e(x) = w2[e]·act(w13[e]·x + b13[e]) + b2[e]``.
- :func:`ref_layer`: a whole layer in SPEC §1's forward order.
- :class:`GatedMLP`: a SwiGLU MLP module, the shared expert of the model-style tests.
- :func:`assert_close_dtype`: SPEC §4's tolerances.
"""

from __future__ import annotations

import math

import torch

ALPHA_OAI = 1.702


# --------------------------------------------------------------------------------------------
# scores and top-k
# --------------------------------------------------------------------------------------------
def _row_scores(row: list[float], scoring_func: str) -> list[float]:
    """One token's scores, in Python floats (float64)."""
    if scoring_func == "softmax":
        m = max(row)
        ex = [math.exp(v - m) for v in row]
        s = sum(ex)
        return [v / s for v in ex]
    if scoring_func == "sigmoid":
        return [1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v)) for v in row]
    if scoring_func == "sqrtsoftplus":
        # softplus(v) = log(1 + e^v), computed stably
        return [math.sqrt(max(v, 0.0) + math.log1p(math.exp(-abs(v)))) for v in row]
    raise ValueError(scoring_func)


def ref_scores(logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """[T, N] float64 scores."""
    rows = logits.double().tolist()
    return torch.tensor([_row_scores(r, scoring_func) for r in rows], dtype=torch.float64).reshape(logits.shape)


def _rank(values: list[float], candidates: list[int]) -> list[int]:
    """Candidates sorted by value descending, ties toward the lower index."""
    return sorted(candidates, key=lambda i: (-values[i], i))


def _gaps(values: list[float], ranked: list[int], n: int) -> float:
    """Smallest non-zero gap between consecutive ranked values among the first n + 1 (inf if none).

    Exact ties (gap 0) are left out: equal inputs give equal scores in float32 too, and both sides then
    break the tie toward the lower id; only a tiny non-zero gap could rank differently in float32."""
    head = [values[i] for i in ranked[: n + 1]]
    return min((a - b for a, b in zip(head, head[1:]) if a != b), default=math.inf)


def ref_route(
    logits: torch.Tensor,
    top_k: int,
    *,
    scoring_func: str = "softmax",
    renormalize: bool = False,
    bias: torch.Tensor | None = None,
    num_expert_group: int = 1,
    topk_group: int = 1,
    routed_scaling_factor: float = 1.0,
):
    """Score-based routing of every kind; returns (weights [T, K] f64, ids [T, K] int64, margin float)."""
    t, n = logits.shape
    b = [0.0] * n if bias is None else bias.double().tolist()
    ws, ids, margin = [], [], math.inf
    for row in logits.double().tolist():
        s = _row_scores(row, scoring_func)
        sel = [s[i] + b[i] for i in range(n)]
        candidates = list(range(n))
        if num_expert_group > 1:
            per = n // num_expert_group
            gscore = []
            for g in range(num_expert_group):
                members = sorted((sel[i] for i in range(g * per, (g + 1) * per)), reverse=True)
                if bias is not None and per >= 2:
                    gscore.append(members[0] + members[1])
                else:
                    gscore.append(members[0])
            granked = _rank(gscore, list(range(num_expert_group)))
            if topk_group < num_expert_group:  # only the kept/dropped boundary decides (exact ties are fine)
                gap = gscore[granked[topk_group - 1]] - gscore[granked[topk_group]]
                margin = min(margin, gap if gap != 0 else math.inf)
            kept = sorted(granked[:topk_group])
            candidates = [i for g in kept for i in range(g * per, (g + 1) * per)]
        ranked = _rank(sel, candidates)
        margin = min(margin, _gaps(sel, ranked, top_k if top_k < len(candidates) else top_k - 1))
        chosen = ranked[:top_k]
        w = [s[i] for i in chosen]
        if renormalize:
            tot = sum(w)
            w = [v / tot for v in w]
        w = [v * routed_scaling_factor for v in w]
        ws.append(w)
        ids.append(chosen)
    return (
        torch.tensor(ws, dtype=torch.float64).reshape(t, top_k),
        torch.tensor(ids, dtype=torch.int64).reshape(t, top_k),
        margin,
    )


def ref_hash_route(logits, table, input_ids, *, scoring_func="softmax", renormalize=False, routed_scaling_factor=1.0):
    """Hash routing: ids = table[input_ids]; weights from the unbiased scores, renormalised, scaled."""
    t = logits.shape[0]
    k = table.shape[1]
    ws, ids = [], []
    for row, tok in zip(logits.double().tolist(), input_ids.reshape(-1).tolist()):
        s = _row_scores(row, scoring_func)
        chosen = [int(v) for v in table[tok].tolist()]
        w = [s[i] for i in chosen]
        if renormalize:
            tot = sum(w)
            w = [v / tot for v in w]
        ws.append([v * routed_scaling_factor for v in w])
        ids.append(chosen)
    return torch.tensor(ws, dtype=torch.float64).reshape(t, k), torch.tensor(ids, dtype=torch.int64).reshape(t, k)


def ref_zero_expert_route(logits, x, bias, num_experts, top_k, *, scoring_func="softmax", renormalize=False,
                          routed_scaling_factor=1.0):
    """LongCat-Flash: route over E + Z with the bias, zero[t] = x[t]·Σ_{id>=E} w; mask zero slots.

    Returns (raw_w, raw_ids, masked_w, masked_ids, zero [T, H] f64, margin)."""
    w, ids, margin = ref_route(logits, top_k, scoring_func=scoring_func, renormalize=renormalize, bias=bias,
                               routed_scaling_factor=routed_scaling_factor)
    xs = x.double()
    zero = torch.zeros(xs.shape, dtype=torch.float64)
    mw, mids = w.clone(), ids.clone()
    for t in range(ids.shape[0]):
        for j in range(top_k):
            if int(ids[t, j]) >= num_experts:
                zero[t] += xs[t] * float(w[t, j])
                mw[t, j] = 0.0
                mids[t, j] = 0
    return w, ids, mw, mids, zero, margin


def llama4_routing_function(hidden_states, gating_output, topk, renormalize):
    """A Llama 4 style custom routing function (used *by the tests* as the user's function):
    ids = topk(logits), w = sigmoid(logits[ids]); equal logits go to the lower id (a stable sort: ``torch.topk``
    promises no order among ties, and :func:`ref_llama4_routing` ranks them so)."""
    ordered = torch.sort(gating_output, dim=-1, descending=True, stable=True)
    vals, ids = ordered.values[..., :topk], ordered.indices[..., :topk]
    return torch.sigmoid(vals.float()), ids.to(torch.int32)


def ref_llama4_routing(logits, top_k, routed_scaling_factor=1.0):
    """Naive twin of :func:`llama4_routing_function` (top-k of the raw logits, sigmoid weight)."""
    t = logits.shape[0]
    ws, ids, margin = [], [], math.inf
    for row in logits.double().tolist():
        ranked = _rank(row, list(range(len(row))))
        margin = min(margin, _gaps(row, ranked, top_k))
        chosen = ranked[:top_k]
        ws.append([routed_scaling_factor / (1.0 + math.exp(-row[i])) for i in chosen])
        ids.append(chosen)
    return (torch.tensor(ws, dtype=torch.float64).reshape(t, top_k),
            torch.tensor(ids, dtype=torch.int64).reshape(t, top_k), margin)


# --------------------------------------------------------------------------------------------
# experts
# --------------------------------------------------------------------------------------------
def ref_act(h: torch.Tensor, activation: str, swiglu_limit: float | None = None) -> torch.Tensor:
    """h: [..., 2I] (gated) or [..., I] (relu2), float64 in and out; elementwise formulas of SPEC §1."""
    h = h.double()
    if activation in ("relu2", "relu2_no_mul"):
        r = torch.where(h > 0, h, torch.zeros_like(h))
        return r * r
    inter = h.shape[-1] // 2
    g, u = h[..., :inter].clone(), h[..., inter:].clone()
    if activation == "softcap_swiglu":  # Inkling-2: c_g = 4, c_u = 25, no limit
        return 4.0 * torch.tanh(g / 4.0) / (1.0 + torch.exp(-g)) * 25.0 * torch.tanh(u / 25.0)
    if activation == "silu_post_clamp":  # Step-3.x: min(silu(g), L) · clamp(u, ±L)
        s = g / (1.0 + torch.exp(-g))
        if swiglu_limit is None:
            return s * u
        lim = swiglu_limit
        return torch.where(s > lim, torch.full_like(s, lim), s) * torch.clamp(u, -lim, lim)
    limit = swiglu_limit
    if activation == "swigluoai" and limit is None:
        limit = 7.0
    if limit is not None:
        g = torch.where(g > limit, torch.full_like(g, limit), g)
        u = torch.where(u > limit, torch.full_like(u, limit), u)
        u = torch.where(u < -limit, torch.full_like(u, -limit), u)
    if activation == "silu":
        return g / (1.0 + torch.exp(-g)) * u
    if activation == "gelu":
        return 0.5 * g * (1.0 + torch.erf(g / math.sqrt(2.0))) * u
    if activation == "gelu_tanh":
        return 0.5 * g * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g**3))) * u
    if activation == "swigluoai":
        return (u + 1.0) * g / (1.0 + torch.exp(-ALPHA_OAI * g))
    raise ValueError(activation)


def ref_expert(x, e, w13, w2, b13=None, b2=None, activation="silu", swiglu_limit=None) -> torch.Tensor:
    """expert_e(x) = w2[e]·act(w13[e]·x + b13[e]) + b2[e]; x: [H] -> [H] float64."""
    x = x.double()
    h = w13[e].double() @ x
    if b13 is not None:
        h = h + b13[e].double()
    a = ref_act(h, activation, swiglu_limit)
    o = w2[e].double() @ a
    if b2 is not None:
        o = o + b2[e].double()
    return o


def ref_experts(x, w13, w2, topk_weights, topk_ids, *, activation="silu", b13=None, b2=None,
                apply_router_weight_on_input=False, expert_map=None, swiglu_limit=None) -> torch.Tensor:
    """out[t] = Σ_j w[t,j]·expert_{ids[t,j]}(x[t]) (or expert(w·x) on input), [T, H] float64.

    A slot whose id (after ``expert_map``) is negative adds nothing."""
    t_total, h = x.shape
    out = torch.zeros(t_total, h, dtype=torch.float64)
    wt = topk_weights.double()
    for t in range(t_total):
        for j in range(topk_ids.shape[1]):
            gid = int(topk_ids[t, j])
            e = int(expert_map[gid]) if expert_map is not None else gid
            if e < 0:
                continue
            w = float(wt[t, j])
            if apply_router_weight_on_input:
                out[t] += ref_expert(w * x[t].double(), e, w13, w2, b13, b2, activation, swiglu_limit)
            else:
                out[t] += w * ref_expert(x[t], e, w13, w2, b13, b2, activation, swiglu_limit)
    return out


# --------------------------------------------------------------------------------------------
# a whole layer (SPEC §1 forward order)
# --------------------------------------------------------------------------------------------
def ref_layer(hidden_states, router_logits, *, route_fn, num_experts, w13, w2, b13=None, b2=None,
              activation="silu", swiglu_limit=None, apply_router_weight_on_input=False,
              scale_on_output=None, gate=None, routed_input_transform=None, routed_output_transform=None,
              shared_experts=None, shared_expert_gate=None):
    """Float64 layer output, steps 1-9 of SPEC §1.

    ``route_fn(x_routed_f64, logits) -> (weights [T, K], ids [T, K])`` with ids over E + Z (ids >= E are
    zero experts); module arguments are float64 callables. Returns [..., H_out] float64.
    """
    lead = hidden_states.shape[:-1]
    h = hidden_states.double().reshape(-1, hidden_states.shape[-1])
    x = routed_input_transform(h) if routed_input_transform is not None else h  # 1
    if router_logits is None:  # 2
        logits = gate(x)
    else:
        logits = router_logits.reshape(-1, router_logits.shape[-1])
    w, ids = route_fn(x, logits)  # 3
    ids, w = torch.as_tensor(ids).long(), torch.as_tensor(w).double()
    zero = ids >= num_experts  # 5: zero (identity) experts add w · x
    routed = ref_experts(x, w13, w2, w, ids.masked_fill(zero, -1), activation=activation, b13=b13, b2=b2,
                         apply_router_weight_on_input=apply_router_weight_on_input, swiglu_limit=swiglu_limit)  # 4
    routed = routed + (w * zero).sum(-1, keepdim=True) * x
    if scale_on_output is not None:  # 6
        routed = routed * scale_on_output
    if routed_output_transform is not None:  # 7
        routed = routed_output_transform(routed)
    out = routed
    if shared_experts is not None:  # 8
        shared = shared_experts(h)
        if shared_expert_gate is not None:
            shared = (1.0 / (1.0 + torch.exp(-shared_expert_gate(h)))) * shared
        out = out + shared  # 9
    return out.reshape(*lead, out.shape[-1])


class GatedMLP(torch.nn.Module):
    """down(silu(gate(x)) · up(x)) with gate and up in one [2·inter, h] Linear; a shared expert."""

    def __init__(self, h: int, inter: int, h_out: int | None = None):
        super().__init__()
        self.gate_up = torch.nn.Linear(h, 2 * inter, bias=False)
        self.down = torch.nn.Linear(inter, h_out or h, bias=False)

    def forward(self, x):
        g, u = self.gate_up(x).chunk(2, -1)
        return self.down(torch.nn.functional.silu(g) * u)


# --------------------------------------------------------------------------------------------
# tolerances (SPEC §4)
# --------------------------------------------------------------------------------------------
def assert_close_dtype(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """fp32: atol = rtol = 1e-4 against the float64 reference. bf16/fp16: relative RMS error <= 1e-2 and
    max error <= 3e-2 · max|ref|."""
    assert out.shape == ref.shape, f"shape {list(out.shape)} != reference {list(ref.shape)}"
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(o).all(), "output has non-finite values"
    if dtype == torch.float32 or dtype == torch.float64:
        torch.testing.assert_close(o, r, atol=1e-4, rtol=1e-4)
        return
    assert dtype in (torch.bfloat16, torch.float16), dtype
    if r.numel() == 0:
        return
    err = o - r
    rms_err = err.square().mean().sqrt().item()
    rms_ref = r.square().mean().sqrt().item()
    max_err = err.abs().max().item()
    max_ref = r.abs().max().item()
    assert rms_err <= 1e-2 * rms_ref, f"{dtype}: relative RMS error {rms_err / max(rms_ref, 1e-300):.3e} > 1e-2"
    assert max_err <= 3e-2 * max_ref, f"{dtype}: max error {max_err:.3e} > 3e-2 * max|ref| = {3e-2 * max_ref:.3e}"


def assert_tie_free(margin: float, tol: float = 1e-5) -> None:
    """The test's input decides every id by more than ``tol`` (so float32 and float64 ranks agree)."""
    assert margin > tol, f"test input is not tie-free (margin {margin:.3e}); choose another seed"


# --------------------------------------------------------------------------------------------
# input makers
# --------------------------------------------------------------------------------------------
def spread_logits(t: int, n: int, scale: float = 0.5, gen: torch.Generator | None = None) -> torch.Tensor:
    """[T, N] float32 logits, each row a random permutation of a well-spaced ladder (tie-free by design)."""
    rows = [torch.randperm(n, generator=gen).float() for _ in range(t)]
    base = torch.stack(rows) if rows else torch.empty(0, n)
    noise = torch.rand(t, n, generator=gen) * 0.1
    return (base - n / 2) * scale + noise * scale


def make_expert_weights(e, inter, h, *, gated=True, bias=False, dtype=torch.float32, scale=1.0):
    """w13 [E, 2I|I, H], w2 [E, H, I] (and biases) with unit-ish activations."""
    rows = 2 * inter if gated else inter
    w13 = (torch.randn(e, rows, h) / math.sqrt(h) * scale).to(dtype)
    w2 = (torch.randn(e, h, inter) / math.sqrt(inter)).to(dtype)
    b13 = (torch.randn(e, rows) * 0.5).to(dtype) if bias else None
    b2 = (torch.randn(e, h) * 0.5).to(dtype) if bias else None
    return w13, w2, b13, b2


def rel_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative RMS error ``|out - ref| / |ref|`` of a whole output, in float64 on the CPU (the tolerance
    measure of SPEC §8)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()
