"""Shared experts of an fp8 checkpoint, kept in fp8: :class:`QuantSharedMLP` and its loader helpers.

A shared MLP is one expert that every token selects with weight 1:
``shared(x) = scale · Σ_{j<1} 1 · expert_0(x)`` with ``topk_ids = 0 [T, 1]``, ``topk_weights = 1 [T, 1]``,
so it runs through the quantised experts op of the layer's kernel table (SPEC §8 math: w8a8 fp8 GEMMs,
activations quantised per token and group of ``block_k`` / per token / statically), the Triton kernel
on CUDA and the torch twin elsewhere. Decision and cost (docs/architecture.md): at DeepSeek-V3 decode a
bf16 shared expert streams 88 MB against 44 MB in fp8 (the routed experts ~352 MB), so dequantising it
would cost ~10 % of the step.

- :func:`shared_format`: the fp8 format a block's shared experts load in, or None (dequantised / bf16).
- :func:`shared_groups`: the checkpoint keys of a shipped fp8 shared MLP among a block's dense groups.
- :func:`quant_shared_from_checkpoint` / :func:`quant_shared_from_float`: build the module.
"""

from __future__ import annotations

import torch

from ..experts.params import check_scale_values, keep_dtypes
from ..ops.activation import effective_limit, get_activation
from ..ops.formats import Fp8BlockFormat, Fp8ChannelFormat
from ..ops.kernels import resolve_kernels
from ..ops.quant_config import parse_quant_config
from ..ops.quantize import check_quant_weights, quantize_experts
from .quant import SCALE_PARTS

__all__ = ["QuantSharedMLP", "quant_shared_from_checkpoint", "quant_shared_from_float", "shared_format",
           "shared_groups", "shared_projs"]

FP8_FORMATS = (Fp8BlockFormat, Fp8ChannelFormat)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class QuantSharedMLP(torch.nn.Module):
    """fp8 shared expert, ``x [..., H] -> scale · expert_0(x) [..., H]`` (module docstring): one expert
    with K = 1 through ``kernels.experts_quant`` (None: the table of ``backend="auto"`` for x's device).

    fmt: an fp8 format (:class:`Fp8BlockFormat` / :class:`Fp8ChannelFormat`, or its HF dict);
    w13: [1, 2I, H] float8_e4m3fn (gate rows, then up; non-gated relu2: [1, I, H]); w2: [1, H, I] float8_e4m3fn;
    w13_scale: block [1, 2·⌈I/bn⌉, ⌈H/bk⌉] (gate grid, then up grid), channel [1, 2I], tensor [1, 2] float;
    w2_scale: block [1, ⌈H/bn⌉, ⌈I/bk⌉], channel [1, H], tensor [1] float;
    w13_input_scale / w2_input_scale: [1] float, static-input formats only.
    Scales are stored float32. Every buffer keeps its dtype under ``.to(dtype)`` / ``.half()`` (only the
    device moves): the output follows the dtype of x, there are no float parameters to convert.
    """

    #: may be captured in the layer's internal CUDA graph (:mod:`moekit.experts.graphed_plan`): the
    #: Triton path has no host synchronisation; the torch twin (host checks) runs only where no graph is
    #: captured (CPU / the torch backend, whose layers are never graphed)
    _moekit_graph_safe = True

    def __init__(self, fmt, w13: torch.Tensor, w2: torch.Tensor, w13_scale: torch.Tensor, w2_scale: torch.Tensor, *,
                 w13_input_scale: torch.Tensor | None = None, w2_input_scale: torch.Tensor | None = None,
                 activation: str = "silu", swiglu_limit: float | None = None, scale: float = 1.0, kernels=None):
        super().__init__()
        fmt = parse_quant_config(fmt)
        if not isinstance(fmt, FP8_FORMATS):
            raise TypeError(f"fmt must be an fp8 format (fp8_block or fp8_channel), got {fmt!r}")
        e, inter, hidden, gated = check_quant_weights(fmt, w13, w2, w13_scale, w2_scale,
                                                      w13_input_scale=w13_input_scale, w2_input_scale=w2_input_scale)
        if e != 1:
            raise ValueError(f"w13 and w2 must hold one expert (shape [1, ...]), got {e} experts")
        act = get_activation(activation)
        if act.gated != gated:
            raise ValueError(f"activation {act.name!r} is {'' if act.gated else 'not '}gated but w13 has "
                             f"{w13.shape[1]} rows for I = {inter}; expected {2 * inter if act.gated else inter}")
        if kernels is not None:
            kernels.check_supports(fmt)
        self.fmt, self.kernels = fmt, kernels
        self.activation = act.name
        self.swiglu_limit = effective_limit(act.name, swiglu_limit) if gated else None
        self.scale = float(scale)
        self.hidden_size, self.intermediate_size = hidden, inter
        self.register_buffer("w13", w13)
        self.register_buffer("w2", w2)
        self.register_buffer("w13_scale", w13_scale.float())
        self.register_buffer("w2_scale", w2_scale.float())
        self.register_buffer("w13_input_scale", None if w13_input_scale is None else w13_input_scale.float())
        self.register_buffer("w2_input_scale", None if w2_input_scale is None else w2_input_scale.float())
        #: an output norm module ``[..., H] -> [..., H]`` (Ergo's shared expert), or None
        self.norm = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., H] float (the layer's activation dtype) -> [..., H] dtype of x."""
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must have last dimension H = {self.hidden_size}, got shape {list(x.shape)}")
        flat = x.reshape(-1, self.hidden_size)
        t = flat.shape[0]
        ids = torch.zeros((t, 1), dtype=torch.int32, device=x.device)
        weights = torch.ones((t, 1), dtype=torch.float32, device=x.device)
        kernels = self.kernels
        if kernels is None:
            kernels = resolve_kernels("auto", x.device, quiet=True)
            kernels.check_supports(self.fmt)
        out = kernels.experts_quant(
            flat, self.w13, self.w2, weights, ids, fmt=self.fmt, w13_scale=self.w13_scale, w2_scale=self.w2_scale,
            w13_input_scale=self.w13_input_scale, w2_input_scale=self.w2_input_scale, activation=self.activation,
            apply_router_weight_on_input=False, w1_bias=None, w2_bias=None, expert_map=None,
            swiglu_limit=self.swiglu_limit,
        )
        out = out.reshape(x.shape)
        if self.norm is not None:
            out = self.norm(out)
        return out * self.scale if self.scale != 1.0 else out

    def _apply(self, fn, recurse=True):
        return super()._apply(keep_dtypes(fn), recurse)  # fp8 codes and fp32 scales keep their dtypes

    def extra_repr(self) -> str:
        return (f"H={self.hidden_size}, I={self.intermediate_size}, fmt={self.fmt.name}, activation={self.activation!r}, "
                f"scale={self.scale:g}, backend={self.kernels.name if self.kernels is not None else 'auto'!r}")


# ---- loader helpers ---------------------------------------------------------------------------------
def shared_projs(plan) -> tuple[str, ...]:
    """The linears of ``plan``'s shared MLP: gate/up/down, fused gate_up/down, or up/down (non-gated)."""
    if not get_activation(plan.shared_activation).gated:
        return ("up_proj", "down_proj")
    return ("gate_up_proj", "down_proj") if plan.shared_fused else ("gate_proj", "up_proj", "down_proj")


def shared_format(fmt, plan, ckpt_name):
    """The fp8 format ``plan``'s shared experts load in (SPEC §8: the checkpoint's format), or None.

    fmt: the checkpoint's (or asked) format; ckpt_name: ``moekit-relative name -> checkpoint module
    name``, checked with ``fmt.applies_to``."""
    if not plan.shared_intermediate_size or not isinstance(fmt, FP8_FORMATS) or plan.shared_bias:
        return None  # a biased shared MLP (Aria / Nemotron-H mlp_bias=True) stays in full precision
    return fmt if all(fmt.applies_to(ckpt_name(f"shared_experts.{p}")) for p in shared_projs(plan)) else None


def _fused_grid_holds(fmt, inter: int) -> bool:
    """A fused fp8 ``gate_up_proj`` block grid splits into SPEC §8's gate / up shard grids only when no
    block straddles the gate/up boundary (``I`` a multiple of ``block_n``)."""
    return not isinstance(fmt, Fp8BlockFormat) or inter % fmt.block_n == 0


def shared_groups(dense: dict[str, dict[str, str]], plan, fmt) -> dict[str, dict[str, str]] | None:
    """``{proj: {part: key}}`` of a shipped fp8 shared MLP among ``dense`` (:func:`.quant.dense_groups`),
    when the checkpoint is fp8 and the shared MLP's every linear is quantised; else None."""
    if not plan.shared_intermediate_size or not isinstance(fmt, FP8_FORMATS) or plan.shared_bias:
        return None
    mods = {mod[len("shared_experts."):]: parts for mod, parts in dense.items() if mod.startswith("shared_experts.")}
    if set(mods) != set(shared_projs(plan)):
        return None
    if "gate_up_proj" in mods and not _fused_grid_holds(fmt, plan.shared_intermediate_size):
        return None  # decided before any tensor is read: the dense path reads them once, dequantised
    return mods


def _scale_of(parts: dict, key_of: dict) -> tuple[torch.Tensor, str]:
    for p in SCALE_PARTS:
        if p in parts:
            return parts[p], key_of[p]
    raise KeyError(f"{key_of.get('weight', '?')}: a quantised linear needs its scale (weight_scale_inv or weight_scale)")


def _check_scale(t: torch.Tensor, key: str, want: tuple[int, ...]) -> torch.Tensor:
    """``t`` in the layout ``want`` (channel scales [N, 1] and per-tensor [] / [1] accepted as stored; fp32, bf16 or
    e8m0), its values checked (:func:`~moekit.experts.params.check_scale_values`), as float32."""
    if len(want) == 1 and t.numel() == want[0] and (t.dim() <= 1 or (t.dim() == 2 and t.shape[1] == 1)):
        t = t.reshape(want)
    if tuple(t.shape) != want:
        raise ValueError(f"checkpoint key {key!r} has shape {list(t.shape)}, expected {list(want)} for its format")
    if not t.is_floating_point():
        raise TypeError(f"checkpoint key {key!r} must be a float scale, got {t.dtype}")
    check_scale_values(f"checkpoint key {key!r}", t)  # e8m0 (DeepSeek-V4's ``.scale``): the byte 255 is NaN
    return t.float()


def quant_shared_from_checkpoint(plan, fmt, tensors: dict[str, dict[str, torch.Tensor]],
                                 keys: dict[str, dict[str, str]], *, kernels=None, device=None):
    """A :class:`QuantSharedMLP` from a shipped fp8 shared MLP, or None when its layout cannot hold it
    (a fused gate_up block grid whose blocks straddle the gate/up boundary: dequantised instead).

    tensors / keys: ``{proj: {part: tensor / checkpoint key}}`` (:func:`shared_groups`); parts ``weight``
    [N, K] e4m3, a scale (block ``[⌈N/bn⌉, ⌈K/bk⌉]``, channel ``[N]`` / ``[N, 1]``, tensor ``[]`` / ``[1]``),
    ``input_scale`` (static formats). Errors name the checkpoint key: a weight not e4m3 -> TypeError;
    a scale or weight of the wrong shape -> ValueError; a missing input_scale -> KeyError.
    """
    hidden, inter = plan.outer_hidden_size, plan.shared_intermediate_size
    if "gate_up_proj" in tensors and not _fused_grid_holds(fmt, inter):
        return None  # one fused block grid: not the per-shard grids of SPEC §8
    rows = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "gate_up_proj": (2 * inter, hidden),
            "down_proj": (hidden, inter)}
    w, s, x = {}, {}, {}
    for proj, parts in tensors.items():
        wt = parts.get("weight", parts.get("weight_packed"))
        wkey = keys[proj].get("weight", keys[proj].get("weight_packed", proj))
        if wt is None:
            raise KeyError(f"missing checkpoint tensor {wkey}: the shared expert's {proj} weight")
        if wt.dtype != torch.float8_e4m3fn:
            raise TypeError(f"checkpoint key {wkey!r} must be float8_e4m3fn for {fmt.name}, got {wt.dtype}")
        n, k = rows[proj]
        if tuple(wt.shape) != (n, k):
            raise ValueError(f"checkpoint key {wkey!r} has shape {list(wt.shape)}, expected {[n, k]}")
        st, skey = _scale_of(parts, keys[proj])
        if isinstance(fmt, Fp8BlockFormat):
            want = (_cdiv(n, fmt.block_n), _cdiv(k, fmt.block_k))
        else:
            want = (1,) if fmt.per_tensor else (n,)
        w[proj], s[proj] = wt, _check_scale(st, skey, want)
        if getattr(fmt, "static_input", False):
            if "input_scale" not in parts:
                raise KeyError(f"missing checkpoint tensor {wkey[: -len('weight')]}input_scale: {fmt} quantises "
                               "inputs with a static scale")
            x[proj] = _check_scale(parts["input_scale"], keys[proj]["input_scale"], (1,))
    up = [p for p in ("gate_proj", "up_proj", "gate_up_proj") if p in w]
    w13 = torch.cat([w[p] for p in up])[None]
    per_tensor = isinstance(fmt, Fp8ChannelFormat) and fmt.per_tensor
    if per_tensor:
        s13 = torch.cat([s[p].expand(2 if p == "gate_up_proj" else 1) for p in up])[None]  # [1, 2]: gate, up
    else:
        s13 = torch.cat([s[p] for p in up])[None]
    s2 = (s["down_proj"] if per_tensor else s["down_proj"][None]).clone()  # per tensor: [1]
    in13 = torch.stack([x[p] for p in up]).max().reshape(1) if x else None  # the largest, as the routed path
    in2 = x["down_proj"].clone() if x else None
    # (copies of what is kept as read: the checkpoint file's mapping lived on in the layer, round 66)
    return _build(plan, fmt, w13, w["down_proj"][None].clone(), s13, s2, in13, in2, kernels, device)


def quant_shared_from_float(plan, fmt, weights: dict[str, torch.Tensor], *, kernels=None, device=None):
    """A :class:`QuantSharedMLP` from a full-precision shared MLP (``{proj: weight [N, K]}``), quantised by
    :func:`moekit.quantize_experts` on the stacked ``[1, ...]`` weights (quantise-on-load). Returns None for
    a static-input format (it needs calibrated input scales, not made here: the shared MLP stays float)."""
    if getattr(fmt, "static_input", False):
        return None
    up = [weights[p] for p in ("gate_proj", "up_proj", "gate_up_proj") if p in weights]
    q13, q2, s13, s2 = quantize_experts(torch.cat(up)[None], weights["down_proj"][None], fmt)
    return _build(plan, fmt, q13, q2, s13, s2, None, None, kernels, device)


def _build(plan, fmt, w13, w2, s13, s2, in13, in2, kernels, device):
    mod = QuantSharedMLP(fmt, w13, w2, s13, s2, w13_input_scale=in13, w2_input_scale=in2,
                         activation=plan.shared_activation, swiglu_limit=plan.shared_swiglu_limit,
                         scale=plan.shared_scale, kernels=kernels)
    return mod.to(device) if device is not None else mod
