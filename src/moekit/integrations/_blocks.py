"""A moekit layer around a transformers MoE block's own tensors (the engine of
:func:`moekit.integrations.transformers.patch`).

The layer is built from the plan exactly as the loader builds it (small modules on the meta device),
then adopts every tensor of the block under its moekit name: the spec's ``renames``, the same data the
loader reads checkpoints with. Expert stacks become the routed experts' weights: shared where the
transformers layout is moekit's, converted once (a copy) otherwise (transposed / interleaved stacks,
DBRX's flat ``spec.splits``, Inkling's ``spec.appended_experts``). Quantised tensors stay quantised
(:mod:`._quant`): fp8 block stacks (transformers' FineGrainedFP8 ``FP8Experts``) keep their fp8 weights and
float32 scales, an ``FP8Linear`` shared MLP becomes an fp8 ``QuantSharedMLP`` over its weights, and mxfp4 stacks
(``Mxfp4GptOssExperts``, plain layout) stay 4-bit. The layer runs in the dtype of the block's float weights
(router, float shared MLP), never in that of a float32 scale.
"""

from __future__ import annotations

import re

import torch

from .._checks import KERNEL_DTYPES
from ..experts.layout import FusedLayout, down_rows, gate_up_rows, get_fused_layout
from ..experts.routed import RoutedExperts
from ..loading.architectures import BY_MODEL_TYPE, ArchSpec, raw_text_config, rename_block_key
from ..loading.keys import construction_tensors, field_hint, zero_width_shared_gate
from ..loading.modules import build_layer
from ..loading.plan import LayerPlan
from ._restore import adapter_layers
from ._quant import fp8_shared, fp8_stacks, is_quant_tensor, mxfp4_stacks, unplaced_quant_message

#: moekit names of fused expert stacks and their biases / scales (``experts.gate_up_proj_scale_inv``...)
_STACK_RE = re.compile(r"^experts\.[A-Za-z0-9_]+$")


class _UnallocatedRoutedExperts(RoutedExperts):
    """RoutedExperts whose weights start on the meta device: the block's own are adopted."""

    def __init__(self, *args, device=None, **kwargs):
        super().__init__(*args, device="meta", **kwargs)


def block_tensors(block, spec: ArchSpec, plan: LayerPlan) -> dict[str, torch.Tensor]:
    """moekit name -> tensor of every parameter and buffer of the block (of the layer's MoE members for
    a layer-level spec); tensors on the meta device raise ``ValueError``."""
    own = {}
    for member in spec.ckpt_blocks if spec.layer_level else ("",):
        sub = block.get_submodule(member) if member else block
        pre = member + "." if member else ""
        for pname, t in list(sub.named_parameters()) + list(sub.named_buffers()):
            if t.device.type == "meta":
                raise ValueError(
                    f"{plan.name}.{pre}{pname} is on the meta device (offloaded by accelerate, or not materialised); "
                    "patch() needs the block's weights in memory (nothing was changed). Either load the model "
                    "without offloading (no 'disk' / 'cpu' offload in device_map, a max_memory its weights fit in), "
                    "or load it fully, patch(model), then dispatch it with accelerate (accelerate.cpu_offload / "
                    "disk_offload / dispatch_model run on patched models), or call "
                    "moekit.integrations.transformers.register() and load it with experts_implementation='moekit' "
                    "(moekit's experts under transformers' blocks, which runs with offloaded weights)"
                )
            own[rename_block_key(spec, pre + pname)] = t
    return own


def _quant_dtype(own: dict[str, torch.Tensor], stacks: dict[str, torch.Tensor]) -> torch.dtype | None:
    """The activation dtype of a layer whose expert stacks are quantised: that of the block's first float weight
    outside the stacks (router, shared MLP), else of any float tensor. Not a float32 scale's or selection bias's:
    a bf16 fp8 model's layer would be float32 and refuse the bf16 hidden states."""
    skip = set(construction_tensors(own))
    first = [t.dtype for rel, t in own.items() if rel not in stacks and rel not in skip and not is_quant_tensor(rel, t)
             and t.dtype in KERNEL_DTYPES]
    return (first or [t.dtype for t in own.values() if t.dtype in KERNEL_DTYPES] or [None])[0]


def _is_stack(spec: ArchSpec, rel: str) -> bool:
    return bool(_STACK_RE.match(rel)) or rel in spec.appended_experts or any(rel == s[0] for s in spec.splits)


@torch.no_grad()
def moekit_from_block(block, spec: ArchSpec, plan: LayerPlan, backend: str, fmt=None, graph_pool=None,
                      eager_graph_tokens: int | None = None, act_dtype: torch.dtype | None = None, dense_fmt=None):
    """A moekit layer built around the block's own tensors (see the module docs); ``fmt``: the routed experts'
    quantisation format (:func:`moekit.loading.quant.checkpoint_formats`) or None, ``dense_fmt``: that of the other
    linears (the shared MLP; DeepSeek-V4's fp4 experts: fp8 block; None: ``fmt``); ``graph_pool``: the
    :class:`~moekit.experts.graphed.GraphPool` the model's layers share (None: the layer's own);
    ``eager_graph_tokens``: their graph limit (None: :data:`~moekit.experts.graphed.MODEL_GRAPH_TOKENS`);
    ``act_dtype``: the model's activation dtype, which a quantised layer runs in (None: read off the block)."""
    own = block_tensors(block, spec, plan)
    stacks = {rel: t for rel, t in own.items() if _is_stack(spec, rel)}
    if act_dtype not in KERNEL_DTYPES:
        act_dtype = _quant_dtype(own, stacks)
    quant = fp8_stacks(stacks, getattr(block, "experts", None), plan, fmt) or \
        mxfp4_stacks(block, stacks, spec, plan, fmt, act_dtype)
    w13, w2, b13, b2 = quant[1][:4] if quant else block_stacks(stacks, spec, plan)
    # (round 63: float64 too, which the torch backend runs and the Triton one refuses by name; it was built float32)
    dtype = w13.dtype if w13.dtype in KERNEL_DTYPES or w13.dtype == torch.float64 else act_dtype
    layer = build_layer(plan, device=w13.device, dtype=dtype, backend=backend, tensors=construction_tensors(own),
                        routed_experts_cls=_UnallocatedRoutedExperts, module_device="meta",
                        quant_config=quant[0] if quant else None, graph_pool=graph_pool,
                        eager_graph_tokens=eager_graph_tokens)
    layer.routed_experts.adopt_weights(w13, w2, b13, b2, **(quant[1][4] if quant else {}))
    # (round 58) quantised weights and their scales are frozen (no gradient; transformers' fp8 parameters require
    # grad by default); converted copies (gpt-oss's, Llama 4's stacks) train as the block's stacks did; shared ones
    # keep their own flag
    # (round 63: one flag for every copy, so a frozen down_proj or bias trained once patched, and unpatch wrote it back)
    theirs, sources = {id(t) for t in own.values()}, None if quant else stack_sources(stacks, spec, plan)
    for name, p in layer.routed_experts.named_parameters(recurse=False):
        if quant and (name in ("w13_weight", "w2_weight") or "scale" in name):
            p.requires_grad_(False)
        elif id(p) not in theirs:
            p.requires_grad_(copy_trainable(name, sources, stacks))
    shared = fp8_shared(block, own, spec, plan, dense_fmt or fmt, layer.routed_experts.kernels)  # (checks only)
    targets = {n: t for n, t in list(layer.named_parameters()) + list(layer.named_buffers())
               if not n.startswith("routed_experts.") or n.startswith("routed_experts.expert_output_norm.")}
    numels = {rel: t.numel() for rel, t in own.items()}
    for rel, t in own.items():
        if rel in stacks or rel in construction_tensors({rel: t}) or (shared is not None and rel in shared[1]):
            continue
        if rel not in targets:
            if t.numel() == 0 or zero_width_shared_gate(plan, rel, numels):  # empty parts transformers builds (e.g.
                continue  # n_shared_experts = 0) and a zero-width shared expert's gate: they add nothing
            if is_quant_tensor(rel, t):  # a quantised module moekit cannot hold: no config field is to blame
                raise NotImplementedError(unplaced_quant_message(block, spec, plan, rel))
            hint = field_hint(plan, rel)
            raise NotImplementedError(f"{plan.name}: the block's tensor {rel!r} has no place in the moekit layer"
                                      + (f"; the config fields likely responsible: {hint}" if hint else ""))
        _set_tensor(layer, rel, t)
        targets.pop(rel)
    left = [n for n, t in targets.items() if t is not None and t.device.type == "meta"
            and not (shared is not None and n in shared[1])]  # (the float shared MLP's weights: replaced below)
    if left:
        raise NotImplementedError(f"{plan.name}: the block has no tensors for {left}")
    if shared is not None:  # last, every check passed (round 51's review): building it re-points the block's weights
        mod = shared[0]()
        mod.norm = getattr(layer.shared_experts, "norm", None)  # an output norm (Ergo), adopted above
        layer.shared_experts = mod
    return layer


def _set_tensor(layer, name: str, t: torch.Tensor) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = layer.get_submodule(parent_name) if parent_name else layer
    if leaf in parent._parameters:
        parent._parameters[leaf] = t if isinstance(t, torch.nn.Parameter) else torch.nn.Parameter(t, False)
    else:
        parent._buffers[leaf] = t


def block_stacks(stacks: dict, spec: ArchSpec, plan: LayerPlan):
    """(w13 [E, 2I, H], w2 [E, H, I], b13 [E, 2I] | None, b2 [E, H] | None) from a block's stack tensors
    by moekit name: fused ``experts.{gate_up_proj | up_proj, down_proj}(_bias)`` in ``spec.memory_layout``
    (default the plan's layout), or the flat stacks of ``spec.splits``; then the shared-expert stacks of
    ``spec.appended_experts``."""
    if spec.splits:
        per = {}
        for name, proj, transposed in spec.splits:  # [E * I, H] -> [E, I, H] (transposed: [E, H, I])
            t = stacks[name].view(plan.num_experts, -1, stacks[name].shape[-1])
            per[proj] = t.transpose(1, 2) if transposed else t
        w13, w2, b13, b2 = torch.cat([per["gate_proj"], per["up_proj"]], 1), per["down_proj"].contiguous(), None, None
    else:
        w13 = stacks.get("experts.gate_up_proj", stacks.get("experts.up_proj"))
        b13, b2 = (stacks.get("experts.gate_up_proj_bias"), stacks.get("experts.down_proj_bias")) if plan.has_bias \
            else (None, None)
        w13, w2, b13, b2 = convert_stacks(w13, stacks["experts.down_proj"], b13, b2,
                                          plan.num_experts - plan.routed_shared_experts,
                                          get_fused_layout(spec.memory_layout or plan.fused_layout))
    if spec.appended_experts:
        g, u, d = (stacks[n] for n in spec.appended_experts)
        w13, w2 = torch.cat([w13, torch.cat([g, u], dim=1)]), torch.cat([w2, d])
    return w13, w2, b13, b2


def stack_sources(stacks: dict, spec: ArchSpec, plan: LayerPlan) -> dict[str, list[torch.Tensor]]:
    """The block's stack tensors each of moekit's expert tensors is made of, as :func:`block_stacks` makes them."""
    if spec.splits:
        src = {"w13_weight": [stacks[n] for n, proj, _ in spec.splits if proj != "down_proj"],
               "w2_weight": [stacks[n] for n, proj, _ in spec.splits if proj == "down_proj"]}
    else:
        src = {"w13_weight": [stacks.get("experts.gate_up_proj", stacks.get("experts.up_proj"))],
               "w2_weight": [stacks["experts.down_proj"]]}
        if plan.has_bias:
            src.update(w13_bias=[stacks.get("experts.gate_up_proj_bias")],
                       w2_bias=[stacks.get("experts.down_proj_bias")])
    if spec.appended_experts:
        g, u, d = (stacks[n] for n in spec.appended_experts)
        src["w13_weight"] += [g, u]
        src["w2_weight"].append(d)
    return src


def copy_trainable(name: str, sources: dict | None, stacks: dict) -> bool:
    """Whether moekit's copy ``name`` trains: as the block tensors it is made of do (:func:`stack_sources`);
    ``ValueError`` where they differ (one copy cannot train in part)."""
    flags = {t.requires_grad for t in (sources or {}).get(name, ()) if t is not None}
    if len(flags) > 1:
        rels = [rel for rel, t in stacks.items() if any(t is s for s in sources[name])]
        raise ValueError(f"patch(): moekit's {name} is made of the block tensors {rels}, of which some require grad "
                         f"and some do not; set requires_grad alike on them before patching")
    return flags.pop() if flags else any(t.requires_grad for t in stacks.values())


def converted_stacks(block, spec: ArchSpec, plan: LayerPlan, layer) -> dict[str, torch.Tensor] | None:
    """The block's expert stacks (moekit name -> tensor) when ``layer`` holds converted, trainable copies of them
    (float stacks not in moekit's layout: gpt-oss, Llama 4, DBRX, Inkling ...), else None (shared or quantised)."""
    ex = layer.routed_experts
    if ex.quant is not None:
        return None
    stacks = {rel: t for rel, t in block_tensors(block, spec, plan).items() if _is_stack(spec, rel)}
    theirs = {t.untyped_storage().data_ptr() for t in stacks.values()}
    mine = [t for t in (ex.w13_weight, ex.w2_weight, getattr(ex, "w13_bias", None), getattr(ex, "w2_bias", None))
            if t is not None]
    return stacks if any(t.untyped_storage().data_ptr() not in theirs for t in mine) else None


def carry_back_of(stacks: dict[str, torch.Tensor], model_type: str, plan: LayerPlan, layer) -> None:
    """:func:`carry_back` with the spec found by model type: what a stand-in keeps, so that it pickles (round 63: the
    spec's plan function, made inside a factory for Inkling and Ergo, cannot be pickled)."""
    carry_back(stacks, BY_MODEL_TYPE[model_type], plan, layer)


@torch.no_grad()
def carry_back(stacks: dict[str, torch.Tensor], spec: ArchSpec, plan: LayerPlan, layer) -> None:
    """Write ``layer``'s expert weights (trained while patched) back into the block's ``stacks`` (in place, in their
    layout, dtype and device): the inverse of :func:`block_stacks`, which only moves elements (views, transposes,
    de-interleaving, concatenation, slicing), taken as its vector-Jacobian product — a scatter of copies, exact.
    Elements it does not read (LongCat's zero-expert rows) keep their values. Nothing is written where the layer's
    weights equal the conversion of the block's stacks (untrained: no write into storage that may be shared or
    read-only; values compared, as version counters miss ``.data`` edits and restart in copies)."""
    ex = layer.routed_experts
    names = list(stacks)
    # (w13, w2 and the biases where the layer has them: block_stacks gives biases exactly where the plan has them)
    now = [t for t in (ex.w13_weight, ex.w2_weight, getattr(ex, "w13_bias", None), getattr(ex, "w2_bias", None))
           if t is not None]

    def forward(*tensors):
        return tuple(t for t in block_stacks(dict(zip(names, tensors)), spec, plan) if t is not None)

    primals = [stacks[n].detach() for n in names]
    outs, pull = torch.func.vjp(forward, *primals)
    if [o.shape for o in outs] != [t.shape for t in now]:
        raise RuntimeError(f"unpatch(): the layer's expert tensors {[tuple(t.shape) for t in now]} do not match the "
                           f"block's converted stacks {[tuple(o.shape) for o in outs]}")
    want = tuple(t.detach().to(device=o.device, dtype=o.dtype) for t, o in zip(now, outs))
    if all(torch.equal(o, w) for o, w in zip(outs, want)):
        return
    back = pull(want)
    if sum(o.numel() for o in outs) != sum(p.numel() for p in primals):  # some elements not read: keep them
        cover = pull(tuple(torch.ones_like(o) for o in outs))
        back = [torch.where(c != 0, b, p) for b, c, p in zip(back, cover, primals)]
    for n, b in zip(names, back):
        stacks[n].copy_(b)


def convert_stacks(w13, w2, b13, b2, num_experts: int, layout: FusedLayout):
    """(w13 [E, 2I, H], w2 [E, H, I], b13 [E, 2I] | None, b2 [E, H] | None) from fused stacks stored in
    ``layout``: the tensors themselves for "rows", converted copies otherwise. LongCat's gate/up stack has
    ``E + Z`` rows: the first ``E`` are the real experts."""
    w13, w2 = gate_up_rows(w13, layout), down_rows(w2, layout)
    b13 = gate_up_rows(b13, layout, bias=True) if b13 is not None else None
    if w13.shape[0] != num_experts:
        w13, b13 = w13[:num_experts], (b13[:num_experts] if b13 is not None else None)
        w2, b2 = w2[:num_experts], (b2[:num_experts] if b2 is not None else None)
    if layout.transposed or layout.interleaved:
        w13, w2 = w13.contiguous(), w2.contiguous()
    return w13, w2, b13, b2


def train_time_routing(block) -> str | None:
    """What transformers' ``block`` routes differently in training mode, which a patched block (eval-mode routing)
    does not reproduce, or None: input jitter (Mixtral, MiniMax: ``router_jitter_noise`` > 0; DBRX:
    ``moe_jitter_eps``), PhiMoE's sparsemixer (it samples in training mode)."""
    for m in block.modules():
        if type(m).__name__.startswith("Phimoe"):
            return "PhiMoE's sparsemixer samples its experts in training mode"
        jitter = getattr(m, "jitter_noise", None)
        if isinstance(jitter, (int, float)) and jitter > 0:
            return f"input jitter: config router_jitter_noise = {jitter}"
        eps = getattr(m, "moe_jitter_eps", None)
        if isinstance(eps, (int, float)) and eps > 0:
            return f"input jitter: config moe_jitter_eps = {eps}"
    return None


def refuse_train_routing(what: str):
    """The error of a patched block called in training mode whose original routes differently there."""
    raise NotImplementedError(
        f"this patched MoE block runs transformers' eval-mode routing; in training mode the original block routes "
        f"differently ({what}), which moekit does not reproduce. Call .eval() for inference, set that config field "
        "to 0 before patching, or unpatch() the model to train with it")


#: routing settings transformers copies into a block (or its router) when it builds it: block attribute -> (the
#: config.json field it comes from, what moekit's plan of the block runs)
BLOCK_SETTINGS = {"top_k": ("num_experts_per_tok", lambda p: p.top_k),
                  "norm_topk_prob": ("norm_topk_prob", lambda p: p.renormalize),
                  "routed_scaling_factor": ("routed_scaling_factor", lambda p: p.routed_scaling_factor),
                  "n_group": ("n_group", lambda p: p.num_expert_group),
                  "topk_group": ("topk_group", lambda p: p.topk_group)}


def check_block_settings(module: torch.nn.Module, plan: LayerPlan, name: str, config: dict) -> None:
    """``ValueError`` where a routing setting the block (or one of its direct children, the router) holds differs from
    the config field it was copied from and from what moekit's plan runs: the config was edited after the model was
    built, so transformers runs the block's value and :func:`patch` would run the config's (round 61: a silently
    different output). Both must differ: a plan may run another value by design (PhiMoE's sparsemixer routes 2 whatever
    ``top_k`` says, Cohere2-MoE's softmax renormalises whatever ``norm_topk_prob`` says), and a class may fill the
    attribute from another field (Step-3.7's scale)."""
    text = raw_text_config(config) or {}
    for owner in (module, *module.children()):
        for attr, (field, planned) in BLOCK_SETTINGS.items():
            mine, cfg, want = owner.__dict__.get(attr), text.get(field), planned(plan)
            if all(isinstance(v, (bool, int, float)) for v in (mine, cfg, want)) and mine != cfg and mine != want:
                raise ValueError(
                    f"patch(): block {name} has {type(owner).__name__}.{attr} = {mine!r} but the model's config has "
                    f"{field} = {cfg!r} and moekit's plan from it runs {want!r} (the config edited after the model "
                    "was built?): transformers runs the block's value; make them agree (set the config before "
                    "building the model)")


def check_no_adapters(name: str, module) -> None:
    """``ValueError`` where a block holds PEFT adapter layers (``get_peft_model`` before ``patch()``): their wrapped
    tensors have no place in a moekit layer (round 69: the refusal blamed the config's fields or a missing bias)."""
    found = adapter_layers(module)
    if found:
        raise ValueError(f"{name} holds PEFT adapter layers ({', '.join(found[:4])}{', ...' if len(found) > 4 else ''}"
                         "): patch() the model before get_peft_model(), or merge_and_unload() first; nothing was "
                         "changed")
