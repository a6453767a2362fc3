"""Quantised tensors of a transformers MoE block in a moekit layer (the quantised side of
:func:`moekit.integrations._blocks.moekit_from_block`). The quantised weights are never dequantised:

- fp8 expert stacks (transformers' FineGrainedFP8 ``FP8Experts``): ``gate_up_proj [E, 2I, H]`` /
  ``down_proj [E, H, I]`` e4m3 with ``*_scale_inv`` block scales, shared as they are (:func:`fp8_stacks`).
- fp8 shared MLPs (``FP8Linear`` gate / up / down: ``weight [N, K]`` e4m3, ``weight_scale_inv
  [⌈N/bn⌉, ⌈K/bk⌉]``): a :class:`~moekit.loading.quant_shared.QuantSharedMLP` (one expert with K = 1, the
  same w8a8 block math) whose ``w13 [1, 2I, H]`` is one tensor that the block's gate and up linears then use
  as views (:func:`fp8_shared`).
- mxfp4 expert stacks (transformers' ``Mxfp4GptOssExperts`` in the plain layout: uint8 codes ``[E, N, K/2]``
  or the checkpoint's ``*_blocks [E, N, K/32, 16]``, e8m0 ``*_scales [E, N, K/32]``; DeepSeek-V4's ``FP8Experts``
  with ``expert_dtype "fp4"``: int8 codes ``[E, N, K/2]``, e8m0 ``*_scale_inv [E, N, K/32]``), gate/up rows
  interleaved as the plan's layout says: SPEC §8's mxfp4 layout, the gate/up stack and its scales and bias
  de-interleaved once (a copy of the 4-bit bytes), the down stack shared (:func:`mxfp4_stacks`). The layout
  transformers builds on a GPU (``Mxfp4GptOssExperts`` holding triton_kernels ``Tensor`` wrappers in a swizzled
  layout, the scales in ``{proj}_precision_config.weight_scale``) is read back through each layout's own
  ``unswizzle_data``, as transformers' ``Mxfp4ReverseDeserialize`` does, then mapped as the plain layout: the moekit
  layer holds plain-layout copies (views where ``unswizzle_data`` returns the stored tensor, e.g. ``StridedLayout``
  scales). The swizzled tensors are only read (the block is not changed): a block kept for ``unpatch()`` holds them
  beside the layer's copies, a second copy of its experts, as the plain layout's interleaved gate/up stack is. They are
  no parameters or buffers: :func:`~._restore.swizzled_storages` lists them for the byte count that decides whether a
  replaced block is kept without ``restorable=True``.
"""

from __future__ import annotations

import torch

from ..experts.layout import FusedLayout, gate_up_rows, get_fused_layout
from ..experts.params import check_range
from ..loading.architectures import ArchSpec, checkpoint_block_key
from ..loading.plan import LayerPlan
from ..loading.quant_shared import QuantSharedMLP, shared_projs
from ..ops.formats import Fp8BlockFormat, Mxfp4Format
from ._restore import stored_tensor

#: last parts of a block tensor's name that mark a quantised linear's tensors, and endings that mark a quantised
#: expert stack's (``experts.gate_up_proj_blocks`` ...)
QUANT_LEAVES = ("weight_scale_inv", "weight_scale", "activation_scale", "input_scale", "weight_packed", "weight_shape")
QUANT_ENDINGS = ("_blocks", "_scales", "_scale_inv")
_QUANT_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_quant_tensor(rel: str, t: torch.Tensor) -> bool:
    """``rel`` (a block-relative name) names a quantisation tensor: a scale / packed part (``*.weight_scale_inv``,
    ``*_blocks``, ``*_scales`` ...) or a weight stored in fp8."""
    leaf = rel.rpartition(".")[2]
    return t.dtype in _QUANT_DTYPES or leaf in QUANT_LEAVES or leaf.endswith(QUANT_ENDINGS)


def unplaced_quant_message(block, spec: ArchSpec, plan: LayerPlan, rel: str) -> str:
    """The error for a quantisation tensor ``rel`` that has no place in the moekit layer: its module's quantised
    layout is not supported (not a config field's fault)."""
    owner = checkpoint_block_key(spec, rel).rpartition(".")[0]
    try:
        cls = type(block.get_submodule(owner)).__name__ if owner else type(block).__name__
    except AttributeError:
        cls = "?"
    return (f"{plan.name}: the block's tensor {rel!r} belongs to a quantised module, {owner or 'the block'} ({cls}), "
            "whose quantised layout moekit does not support there (patch() maps fp8 block experts 'FP8Experts', fp8 "
            "block shared MLPs 'FP8Linear' and plain mxfp4 experts 'Mxfp4GptOssExperts'); load the model with the "
            "quantisation undone (dequantize=True) or leave that module out of quantization_config")


def fp8_stacks(stacks: dict, experts, plan: LayerPlan, fmt):
    """(format, (w13, w2, b13, b2, {w13_scale, w2_scale})) of fp8 stacks ``gate_up_proj [E, 2I, H]`` /
    ``down_proj [E, H, I]`` e4m3 with ``*_scale_inv`` block scales ``[E, ⌈2I/bn⌉, ⌈H/bk⌉]`` /
    ``[E, ⌈H/bn⌉, ⌈I/bk⌉]`` (transformers' FineGrainedFP8); None when the stacks are full precision (e.g.
    dequantised at load). The fp8 stacks are shared; float32 scales too (e8m0 scales are converted, a
    copy of the scales only)."""
    w = stacks.get("experts.gate_up_proj")
    if w is None or w.dtype != torch.float8_e4m3fn:
        return None
    if not isinstance(fmt, Fp8BlockFormat) or "experts.gate_up_proj_scale_inv" not in stacks:
        raise NotImplementedError(f"{plan.name}: fp8 experts of format {fmt} (only block fp8, 'FP8Experts', is mapped)")
    if getattr(experts, "activation_scheme", "dynamic") != "dynamic" or plan.has_bias:
        raise NotImplementedError(f"{plan.name}: fp8 experts with static activations or biases")
    s13, s2 = stacks["experts.gate_up_proj_scale_inv"], stacks["experts.down_proj_scale_inv"]
    want = fmt.w13_scale_shape(plan.num_experts, plan.intermediate_size, plan.hidden_size)
    if tuple(s13.shape) != want or plan.intermediate_size % fmt.block_n:  # shapes may agree (I = 56, bn = 32)
        raise NotImplementedError(
            f"{plan.name}: gate_up_proj_scale_inv {list(s13.shape)} is one grid over both halves; moekit keeps a grid "
            f"per shard {list(want)} (equal only when I = {plan.intermediate_size} is a multiple of {fmt.block_n})"
        )
    s13, s2 = (_float_scale(s) for s in (s13, s2))
    return fmt, (w, stacks["experts.down_proj"], None, None, {"w13_scale": s13, "w2_scale": s2})


def _float_scale(s: torch.Tensor) -> torch.Tensor:
    return s if s.dtype == torch.float32 else torch.nn.Parameter(s.float(), requires_grad=False)


# ---- fp8 shared MLPs ---------------------------------------------------------------------------------
def fp8_shared(block, own: dict, spec: ArchSpec, plan: LayerPlan, fmt, kernels):
    """(a function building the :class:`QuantSharedMLP`, the moekit names it consumes) for a block whose shared MLP
    is made of
    ``FP8Linear`` (``shared_experts.{gate_proj, up_proj, down_proj}.weight`` e4m3 + ``weight_scale_inv``; fused
    ``gate_up_proj`` or non-gated ``up_proj`` alike); None when its weights are not fp8. ``own``: moekit name ->
    tensor of the block. ``kernels``: the layer's kernel table (the routed experts').

    No fp8 byte is copied where it stays: ``w2 [1, H, I]`` and the down scales are views of the block's; the gate and
    up weights become one ``[2I, H]`` tensor (:func:`_joined`). Refused (``NotImplementedError``): another format
    than fp8 block, static activation scales, biases, a block size other than the format's, some linears fp8 and
    some not, a fused gate_up grid whose blocks straddle the gate/up halves."""
    projs = shared_projs(plan) if plan.shared_intermediate_size else ()
    names = {p: f"shared_experts.{p}" for p in projs}
    weights = {p: own.get(f"{n}.weight") for p, n in names.items()}
    fp8 = [p for p, w in weights.items() if w is not None and w.dtype == torch.float8_e4m3fn]
    if not fp8:
        return None
    what = f"{plan.name}.{checkpoint_block_key(spec, 'shared_experts.').rstrip('.')}"
    if len(fp8) != len(projs):
        raise NotImplementedError(f"{what}: fp8 linears {fp8} beside full-precision ones "
                                  f"{sorted(set(projs) - set(fp8))}; moekit runs a shared MLP all fp8 or none")
    if not isinstance(fmt, Fp8BlockFormat):
        raise NotImplementedError(f"{what}: fp8 shared linears of format {fmt} (only block fp8, FineGrainedFP8's "
                                  "'FP8Linear' with weight_scale_inv, is mapped)")
    scales = {}
    for p, n in names.items():
        try:
            module = block.get_submodule(checkpoint_block_key(spec, n))
        except AttributeError:  # not a module of the block under its checkpoint name: no block size to check
            module = None
        extra = [part for part in ("bias", "activation_scale") if own.get(f"{n}.{part}") is not None]
        if extra:
            raise NotImplementedError(f"{what}.{p} ({type(module).__name__}): fp8 linears with {extra} (static "
                                      "activation scales / biases) are not mapped; moekit's fp8 block math is dynamic")
        block_size = getattr(module, "block_size", None)
        if block_size is None or tuple(block_size) != (fmt.block_n, fmt.block_k):
            raise NotImplementedError(f"{what}.{p}: block size {block_size}, not the format's "
                                      f"[{fmt.block_n}, {fmt.block_k}] (per-tensor fp8 linears are not mapped)")
        s = own.get(f"{n}.weight_scale_inv")
        w = weights[p]
        want = (-(-w.shape[0] // fmt.block_n), -(-w.shape[1] // fmt.block_k))
        if s is None or tuple(s.shape) != want:
            raise ValueError(f"{what}.{p}.weight_scale_inv must have shape {list(want)} for weight "
                             f"{list(w.shape)}, got {None if s is None else list(s.shape)}")
        scales[p] = s.float()
    if "gate_up_proj" in weights and plan.shared_intermediate_size % fmt.block_n:
        raise NotImplementedError(f"{what}.gate_up_proj: one block grid over both halves (I = "
                                  f"{plan.shared_intermediate_size} not a multiple of {fmt.block_n})")
    up = [p for p in ("gate_proj", "up_proj", "gate_up_proj") if p in weights]

    def build() -> QuantSharedMLP:  # (called once every check of the block passed: _joined re-points its weights)
        w13 = _joined([weights[p] for p in up]) if len(up) > 1 else weights[up[0]]
        s13 = torch.cat([scales[p] for p in up])
        return QuantSharedMLP(fmt, w13[None], weights["down_proj"][None], s13[None], scales["down_proj"][None],
                              activation=plan.shared_activation, swiglu_limit=plan.shared_swiglu_limit,
                              scale=plan.shared_scale, kernels=kernels)

    return build, {f"{n}.{part}" for n in names.values() for part in ("weight", "weight_scale_inv")}


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """One tensor ``[ΣN, K]`` holding ``parts`` (``[N_i, K]``) one after another, without a second copy of them:
    their own storage where they already lie so (contiguous, back to back: a block patched before), else a new
    tensor that each part's ``.data`` then becomes a view of (same values: the block computes what it computed; its
    Parameter objects stay; the old storages are freed unless held elsewhere)."""
    first = parts[0]
    rows = sum(p.shape[0] for p in parts)
    offset = first.storage_offset()
    adjacent = all(p.is_contiguous() and p.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
                   for p in parts)
    for p in parts:
        adjacent = adjacent and p.storage_offset() == offset
        offset += p.numel()
    if adjacent:
        return first.detach().as_strided((rows, first.shape[1]), (first.shape[1], 1), first.storage_offset())
    out = torch.cat([p.detach() for p in parts])
    start = 0
    for p in parts:
        p.data = out[start : start + p.shape[0]]
        start += p.shape[0]
    return out


# ---- mxfp4 expert stacks -----------------------------------------------------------------------------
_PROJS = ("gate_up_proj", "down_proj")


def _unswizzled(t, name: str, want: tuple, dtypes: tuple, dims: str) -> torch.Tensor:
    """``t``, a triton_kernels ``Tensor`` holding an mxfp4 stack ``want`` = ``[E, N, K]`` swizzled from its transpose
    ``[E, K, N]`` (transformers' ``swizzle_mxfp4_convertops``), back as ``[E, N, K]``: its layout's own
    ``unswizzle_data`` of ``storage.data``, the last two dims swapped (transformers' ``Mxfp4ReverseDeserialize``); a
    view of what ``unswizzle_data`` returns. ``name``: what errors call it; ``dtypes``: those it may hold."""
    storage = getattr(t, "storage", None)
    if stored_tensor(t) is None:
        raise NotImplementedError(f"{name} is a {type(t).__name__}, neither a torch tensor nor a triton_kernels Tensor "
                                  "(.storage.data, .storage.layout); patch() cannot read its mxfp4 bytes")
    layout = getattr(storage, "layout", None)
    if not callable(getattr(layout, "unswizzle_data", None)):
        raise NotImplementedError(
            f"{name}: its triton_kernels layout {type(layout).__name__} has no unswizzle_data; patch() reads swizzled "
            "mxfp4 stacks back only through the layout's own unswizzle_data, the API transformers' mxfp4 integration "
            "uses (Mxfp4ReverseDeserialize; the hub's kernels-community/triton_kernels). Use that triton_kernels, load "
            "the checkpoint with moekit.load_moe_layers, or the model with Mxfp4Config(dequantize=True)")
    out = layout.unswizzle_data(storage.data)
    stored = [want[0], want[2], want[1]]
    if not isinstance(out, torch.Tensor) or list(out.shape) != stored:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{name} (unswizzled): {type(layout).__name__}.unswizzle_data gave {got}, expected "
                         f"{stored} (the transpose of {list(want)}: mxfp4, {dims})")
    if out.dtype not in dtypes:
        raise TypeError(f"{name} (unswizzled) must hold {' or '.join(str(d) for d in dtypes)}, got {out.dtype}")
    return out.transpose(-1, -2)


def _swizzled_stacks(experts, plan: LayerPlan, fmt, what: str) -> dict:
    """``{experts.{proj}: uint8 codes [E, N, K/2], experts.{proj}_scales: e8m0 [E, N, K/32]}`` of the stacks that
    ``experts`` holds in triton_kernels' swizzled layout (``{proj}`` a triton_kernels ``Tensor``, its scales in
    ``{proj}_precision_config.weight_scale``), unswizzled (:func:`_unswizzled`); {} for the plain layout. Only read:
    the module keeps its swizzled tensors."""
    out = {}
    e, inter, hidden = plan.num_experts, plan.intermediate_size, plan.hidden_size
    e8m0 = tuple(d for d in (torch.uint8, getattr(torch, "float8_e8m0fnu", None)) if d is not None)
    for proj in _PROJS:
        t, config = getattr(experts, proj, None), getattr(experts, f"{proj}_precision_config", None)
        if config is None and (t is None or isinstance(t, (torch.Tensor, torch.nn.Module))):
            continue  # the plain layout (or no such stack: mxfp4_stacks tells)
        if isinstance(t, torch.Tensor) or config is None:
            raise NotImplementedError(
                f"{what}.{proj} is a {type(t).__name__} with {proj}_precision_config {type(config).__name__}; patch() "
                "maps triton_kernels' swizzled stacks (a triton_kernels Tensor, its scales in a PrecisionConfig) or "
                "plain uint8 codes with *_scales tensors, not a mix")
        if not isinstance(fmt, Mxfp4Format):
            raise NotImplementedError(f"{what}: swizzled expert stacks with quantization_config {fmt} (only mxfp4 is "
                                      "mapped)")
        dims = f"E={e}, I={inter}, H={hidden}"
        wants = (fmt.w13_shape(e, inter, hidden), fmt.w13_scale_shape(e, inter, hidden)) if proj == "gate_up_proj" \
            else (fmt.w2_shape(e, inter, hidden), fmt.w2_scale_shape(e, inter, hidden))
        out[f"experts.{proj}"] = _unswizzled(t, f"{what}.{proj}", wants[0], (torch.uint8, torch.int8), dims)
        scale_name = f"{what}.{proj}_precision_config.weight_scale"
        out[f"experts.{proj}_scales"] = _unswizzled(getattr(config, "weight_scale", None), scale_name, wants[1], e8m0,
                                                    dims)
    return out


def _mxfp4_part(stacks: dict, proj: str, kind: str, what: str) -> torch.Tensor | None:
    """The codes (``kind`` "weight": ``{proj}`` uint8 [E, N, K/2] or ``{proj}_blocks`` [E, N, K/32, 16] flattened;
    transformers 5.17 declares ``{proj}`` itself [E, N, K/32, 16]) or e8m0 scales (``{proj}_scales``, uint8 or
    float8_e8m0fnu viewed as uint8) of one mxfp4 stack."""
    if kind == "weight":
        t = stacks.get(f"experts.{proj}_blocks")
        t = t if t is not None else stacks.get(f"experts.{proj}")
        t = t.flatten(-2) if t is not None and t.dim() == 4 else t
    else:  # (``*_scale_inv``: transformers' FP8Experts with expert_dtype "fp4", DeepSeek-V4: the same per-32 e8m0)
        t = stacks.get(f"experts.{proj}_scales")
        t = t if t is not None else stacks.get(f"experts.{proj}_scale_inv")
        if t is not None and t.dtype == getattr(torch, "float8_e8m0fnu", None):
            t = t.view(torch.uint8)
    if t is not None and t.dtype == torch.int8:
        t = t.view(torch.uint8)
    if t is not None and t.dtype != torch.uint8 and kind == "scale":
        raise TypeError(f"{what}.{proj}_scales must hold uint8 (or float8_e8m0fnu) e8m0 exponents, got {t.dtype}")
    return t


def mxfp4_stacks(block, stacks: dict, spec: ArchSpec, plan: LayerPlan, fmt, dtype: torch.dtype | None):
    """(format, (w13, w2, b13, b2, {w13_scale, w2_scale})) in SPEC §8's mxfp4 layout (``w13 [E, 2I, H/2]`` uint8 gate
    rows then up, ``w2 [E, H, I/2]``, e8m0 scales ``[E, 2I, H/32]`` / ``[E, H, I/32]``, biases in ``dtype``) from a
    block whose expert stacks are mxfp4 codes; None when they are not (float stacks: transformers dequantised them).
    Interleaved gate/up rows (gpt-oss) are de-interleaved: a converted copy of the 4-bit bytes and their scales; the
    down stack and its scales are shared.

    The stacks of transformers' GPU layout (triton_kernels' swizzled tensors, scales in a ``PrecisionConfig``) are
    unswizzled through their layouts' ``unswizzle_data`` (:func:`_swizzled_stacks`; refused, ``NotImplementedError``,
    for a layout without it) and then checked and converted as the plain layout; the layer holds contiguous copies
    (views where ``unswizzle_data`` returns the stored tensor). The block is not changed: kept for ``unpatch()``, it
    holds its swizzled tensors beside those copies, as a plain block holds its interleaved gate/up stack beside the
    de-interleaved copy (:func:`~._restore.swizzled_storages` lists them: they are no parameters)."""
    experts = getattr(block, "experts", None)
    what = f"{plan.name}.experts ({type(experts).__name__})"
    swizzled = _swizzled_stacks(experts, plan, fmt, what) if experts is not None else {}
    stacks = {**stacks, **swizzled}
    w13 = _mxfp4_part(stacks, "gate_up_proj", "weight", what)
    if w13 is None or w13.dtype != torch.uint8:
        return None  # float stacks (dequantised at load), or another format's (fp8: fp8_stacks)
    if not isinstance(fmt, Mxfp4Format):
        raise NotImplementedError(f"{what}: uint8 expert stacks with quantization_config {fmt} (only mxfp4 is mapped)")
    w2, s13, s2 = (_mxfp4_part(stacks, proj, kind, what) for proj, kind in
                   (("down_proj", "weight"), ("gate_up_proj", "scale"), ("down_proj", "scale")))
    if w2 is None or s13 is None or s2 is None:
        raise NotImplementedError(f"{what} holds mxfp4 codes without their e8m0 scales (gate_up_proj_scales / "
                                  "down_proj_scales): not loaded, or kept where patch() does not read them")
    e, inter, hidden = plan.num_experts, plan.intermediate_size, plan.hidden_size
    for name, t, want in (("gate_up_proj", w13, fmt.w13_shape(e, inter, hidden)),
                          ("down_proj", w2, fmt.w2_shape(e, inter, hidden)),
                          ("gate_up_proj_scales", s13, fmt.w13_scale_shape(e, inter, hidden)),
                          ("down_proj_scales", s2, fmt.w2_scale_shape(e, inter, hidden))):
        if tuple(t.shape) != want:
            raise ValueError(f"{what}.{name} must have shape {list(want)} (mxfp4, E={e}, I={inter}, H={hidden}), "
                             f"got {list(t.shape)}")
    # quantised stacks are stored [E, out, in] whatever the float layout; its interleaving of gate/up rows applies
    layout = FusedLayout(transposed=False, interleaved=get_fused_layout(spec.memory_layout or plan.fused_layout)
                         .interleaved)
    b13 = b2 = None
    if plan.has_bias:
        b13, b2 = stacks.get("experts.gate_up_proj_bias"), stacks.get("experts.down_proj_bias")
        if b13 is None or b2 is None:
            raise NotImplementedError(f"{what}: the plan has expert biases but the block holds none")
        b13 = gate_up_rows(b13, layout, bias=True)
        for name, b in (("gate_up_proj_bias", b13), ("down_proj_bias", b2)):  # (round 69: a float16 model's went inf)
            check_range(dtype, b.detach(), f"{what}.{name} (converted to the model's {dtype})")
        b13, b2 = (b if dtype is None or b.dtype == dtype else b.detach().to(dtype) for b in (b13, b2))
    w13, s13 = gate_up_rows(w13, layout), gate_up_rows(s13, layout)
    if swizzled:  # (transposed views of what unswizzle_data gave; no second copy where de-interleaving made one)
        w13, w2, s13, s2 = (t.contiguous() for t in (w13, w2, s13, s2))
    return fmt, (w13, w2, b13, b2, {"w13_scale": s13, "w2_scale": s2})
