"""transformers integration: swap a loaded model's MoE blocks for moekit layers, or register moekit as
an experts implementation (``from_pretrained(..., experts_implementation="moekit")``).

transformers is imported inside the functions only: ``import moekit`` never needs it.

- :func:`patch` replaces every MoE block with :class:`MoEBlockAdapter` around a moekit layer. Router,
  expert and shared-expert weights are shared with the original block (no copy) where the layouts agree
  (every architecture but gpt-oss and Llama 4, whose transposed expert stacks are converted once, a
  copy). The adapter returns what the block returned: a tensor, gpt-oss's ``(hidden, router_scores)``
  or Llama 4's ``(hidden [T, H], router_logits)``. Router-logit recording for auxiliary losses
  (``output_router_logits``) is not reproduced: patched models are for inference.
- :func:`register` adds ``"moekit"`` to transformers' ``ExpertsInterface``: transformers keeps its
  router, moekit runs the experts (``fused_experts``) on the block's own weights. The switch only
  reaches experts classes that transformers decorates with ``@use_experts_implementation``; LongCat-Flash
  and Llama 4 have none, so there transformers would keep its own forward without a word.
  :func:`check_registered` finds that out (and raises); :func:`patch` is the path for those models.

Without transformers installed, :func:`patch`, :func:`register` and :func:`check_registered` raise
``ImportError`` with the install hint ``pip install 'moekit[transformers]'``.
"""

from __future__ import annotations

import re

import torch

from ..experts.layout import FusedLayout, down_rows, gate_up_rows, get_fused_layout
from ..experts.routed import RoutedExperts
from ..loading.architectures import plan_layers
from ..loading.modules import RouterLinear, build_layer
from ..loading.plan import LayerPlan
from ..loading.quant import checkpoint_format, experts_format
from ..ops.formats import Fp8BlockFormat
from ..ops.activation import activation_from_hf

_BLOCK_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(mlp|feed_forward)$")
_INSTALL_HINT = "pip install 'moekit[transformers]'"
#: attributes transformers' ``@use_experts_implementation`` sets on an experts module (what the switch reads)
_SWITCH_ATTRS = ("has_gate", "has_bias", "is_transposed", "is_concatenated")


def _require_transformers(what: str):
    """transformers, or an ``ImportError`` saying how to install it."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            f"moekit.integrations.transformers.{what}() needs the transformers package, which is not "
            f"installed ({err}); install it with: {_INSTALL_HINT}"
        ) from err
    return transformers


class _UnallocatedRoutedExperts(RoutedExperts):
    """RoutedExperts whose weights start on the meta device: :func:`patch` adopts the block's own."""

    def __init__(self, *args, device=None, **kwargs):
        super().__init__(*args, device="meta", **kwargs)


class MoEBlockAdapter(torch.nn.Module):
    """Wraps a moekit layer so it is called like the transformers block it replaces.

    forward(hidden_states [..., H], input_ids=None) -> same as the original block (see module docs).
    """

    def __init__(self, moe, plan: LayerPlan):
        super().__init__()
        self.moe = moe
        self.plan = plan
        self.output = plan.output
        self.needs_input_ids = plan.needs_input_ids

    def forward(self, hidden_states: torch.Tensor, input_ids: torch.Tensor | None = None, **_unused):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        ids = input_ids.reshape(-1) if (self.needs_input_ids and input_ids is not None) else None
        if self.output == "hidden":
            return self.moe(x, input_ids=ids).reshape(shape)
        logits = self.moe.gate(x)
        out = self.moe(x, logits, input_ids=ids)
        if self.output == "hidden_logits":  # Llama 4: flattened output and the router logits
            return out, logits
        weights, _ = self.moe.router.select_experts(x, logits)  # gpt-oss: (hidden, router_scores [T, K])
        return out.reshape(shape), weights.to(hidden_states.dtype)


def _model_config_dict(model) -> dict:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise TypeError(f"patch() needs a transformers PreTrainedModel (with .config), got {type(model).__name__}")
    d = cfg.to_dict()
    d.setdefault("model_type", getattr(cfg, "model_type", None))
    return d


def patch(model, *, backend: str = "auto") -> list[str]:
    """Replace every MoE block of ``model`` by a moekit layer sharing its weights; returns their paths.

    Args:
        model: a loaded transformers ``PreTrainedModel`` (causal LM, or a multimodal wrapper such as
            ``Llama4ForConditionalGeneration``) with its weights in memory (not on the meta device).
        backend: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"torch"`` or ``"triton"``.

    Returns the module paths replaced, e.g. ``["model.layers.0.mlp", ...]``; blocks patched before are
    left as they are (a second call returns ``[]``). Supported: the architectures of
    :func:`moekit.loading.architectures.supported_model_types`. Unsupported architectures raise
    ``NotImplementedError`` listing the supported ones; a model whose MoE blocks are not where its
    config says raises ``RuntimeError``; without transformers, ``ImportError``.
    """
    _require_transformers("patch")
    config = _model_config_dict(model)
    _spec, plans = plan_layers(config)
    fmt, _ = checkpoint_format(config, None)
    by_idx = {p.layer_idx: p for p in plans}
    replaced, already = [], 0
    for name, module in list(model.named_modules()):
        m = _BLOCK_RE.search(name)
        if m is None or int(m.group(1)) not in by_idx:
            continue
        if isinstance(module, MoEBlockAdapter):
            already += 1  # patched before: left as it is
            continue
        plan = by_idx[int(m.group(1))]
        if m.group(2) != plan.name.rsplit(".", 1)[-1] or not hasattr(module, "experts"):
            continue
        adapter = MoEBlockAdapter(_moekit_from_block(module, plan, backend, experts_format(fmt, plan)), plan)
        adapter.train(module.training)  # the replaced block's mode (an eval model stays in eval)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, adapter)
        replaced.append(name)
    if len(replaced) + already != len(plans):
        raise RuntimeError(
            f"patch found {len(replaced)} MoE blocks but the config describes {len(plans)} "
            f"({[p.name for p in plans]}); the model structure is not the expected one"
        )
    return replaced


def _router_parts(block, plan: LayerPlan):
    """(linear weight, linear bias or None, router module holding the buffers) of a transformers block."""
    if hasattr(block, "gate"):
        r = block.gate
    else:
        r = block.router
    lin = r.classifier if hasattr(r, "classifier") else r
    return lin.weight, getattr(lin, "bias", None), r


@torch.no_grad()
def _moekit_from_block(block, plan: LayerPlan, backend: str, fmt=None):
    """A moekit layer built around the block's own tensors: router weights, selection bias / hash table,
    shared experts and expert stacks are shared (expert stacks in a transposed layout are converted once).
    fp8 experts (transformers' FineGrainedFP8 ``FP8Experts``) keep their fp8 stacks and float32 scales."""
    quant = _fp8_stacks(block.experts, plan, fmt)
    weight, lin_bias, router = _router_parts(block, plan)
    for pname, p in block.named_parameters():
        if p.device.type == "meta":
            raise ValueError(
                f"{plan.name}.{pname} is on the meta device (offloaded or not materialised); patch() needs "
                "the block's weights in memory"
            )
    tensors = {}
    if plan.has_score_bias:
        tensors["router.e_score_correction_bias"] = router.e_score_correction_bias
    if plan.hash_routing:
        tensors["router.hash_indices_table"] = router.tid2eid
    gate = RouterLinear(weight.shape[1], weight.shape[0], bias=plan.router_bias, fp32=plan.router_fp32, device="meta")
    gate.weight = weight
    if plan.router_bias:
        gate.bias = lin_bias
    layer = build_layer(
        plan,
        device=weight.device,
        dtype=weight.dtype,
        backend=backend,
        tensors=tensors,
        routed_experts_cls=_UnallocatedRoutedExperts,
        gate=gate,
        shared_experts=(getattr(block, "shared_experts", None) or block.shared_expert)
        if plan.shared_intermediate_size else None,
        shared_expert_gate=block.shared_expert_gate if plan.shared_expert_gate else None,
        quant_config=quant[0] if quant else None,
    )
    if quant:
        w13, w2, b13, b2, scales = quant[1]
        layer.routed_experts.adopt_weights(w13, w2, b13, b2, **scales)
        return layer
    layer.routed_experts.adopt_weights(*_expert_stacks(block.experts, plan.num_experts, plan.has_bias,
                                                       get_fused_layout(plan.fused_layout)))
    return layer


def _fp8_stacks(ex, plan: LayerPlan, fmt):
    """(format, (w13, w2, b13, b2, w13_scale=, w2_scale=)) of an experts module holding fp8 stacks
    ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]`` e4m3 with ``*_scale_inv`` block scales
    ``[E, ⌈2I/bn⌉, ⌈H/bk⌉]`` / ``[E, ⌈H/bn⌉, ⌈I/bk⌉]`` (transformers' FineGrainedFP8); None when the
    stacks are full precision (e.g. dequantised at load). The fp8 stacks are shared; float32 scales too
    (e8m0 scales are converted, a copy of the scales only)."""
    w = getattr(ex, "gate_up_proj", None)
    if w is None or w.dtype != torch.float8_e4m3fn:
        return None
    if not isinstance(fmt, Fp8BlockFormat) or not hasattr(ex, "gate_up_proj_scale_inv"):
        raise NotImplementedError(f"{plan.name}: fp8 experts of format {fmt} (only block fp8, 'FP8Experts', is mapped)")
    if getattr(ex, "activation_scheme", "dynamic") != "dynamic" or plan.has_bias:
        raise NotImplementedError(f"{plan.name}: fp8 experts with static activations or biases")
    s13, s2 = ex.gate_up_proj_scale_inv, ex.down_proj_scale_inv
    want = fmt.w13_scale_shape(plan.num_experts, plan.intermediate_size, plan.hidden_size)
    if tuple(s13.shape) != want:
        raise NotImplementedError(
            f"{plan.name}: gate_up_proj_scale_inv {list(s13.shape)} is one grid over both halves; moekit keeps a grid "
            f"per shard {list(want)} (equal only when I = {plan.intermediate_size} is a multiple of {fmt.block_n})"
        )
    s13, s2 = (s if s.dtype == torch.float32 else torch.nn.Parameter(s.float(), requires_grad=False)
               for s in (s13, s2))
    return fmt, (ex.gate_up_proj, ex.down_proj, None, None, {"w13_scale": s13, "w2_scale": s2})


def _expert_stacks(ex, num_experts: int, has_bias: bool, layout: FusedLayout):
    """(w13 [E, 2I, H], w2 [E, H, I], b13 [E, 2I] | None, b2 [E, H] | None) of a transformers experts
    module stored in ``layout``: the module's own tensors for "rows", converted copies otherwise.
    LongCat's gate/up stack has ``E + Z`` rows: the first ``E`` are the real experts."""
    w13, w2 = gate_up_rows(ex.gate_up_proj, layout), down_rows(ex.down_proj, layout)
    b13 = gate_up_rows(ex.gate_up_proj_bias, layout, bias=True) if has_bias else None
    b2 = ex.down_proj_bias if has_bias else None
    if w13.shape[0] != num_experts:
        w13, b13 = w13[:num_experts], (b13[:num_experts] if b13 is not None else None)
    if layout.transposed or layout.interleaved:
        w13, w2 = w13.contiguous(), w2.contiguous()
    return w13, w2, b13, b2


# -- transformers' experts switch ------------------------------------------------------------------
def _experts_activation(module) -> tuple[str, float | None]:
    """(moekit activation, swiglu_limit) equal to the experts module's gate function."""
    from transformers.integrations import moe as hf_moe

    cls = type(module)
    apply_gate = getattr(cls, "_apply_gate", None)
    name = cls.__name__
    if name == "GptOssExperts":
        if abs(float(module.alpha) - 1.702) > 1e-9:
            raise NotImplementedError(f"{name} with swiglu alpha={module.alpha}: moekit's swigluoai uses 1.702")
        return "swigluoai", float(module.limit)
    if name == "DeepseekV4Experts":
        return "silu", float(module.limit)
    if apply_gate is not getattr(hf_moe, "_default_apply_gate", None):
        raise NotImplementedError(f"experts_implementation='moekit' does not know the gate function of {name}")
    return activation_from_hf(getattr(module.config, "hidden_act", "silu")), None


def _experts_weights(module):
    """(w13 [E, 2I, H], w2 [E, H, I], b13 [E, 2I] | None, b2 [E, H] | None) for ``fused_experts``."""
    if not getattr(module, "is_transposed", False) and getattr(module, "is_concatenated", True):
        b13 = module.gate_up_proj_bias if module.has_bias else None
        b2 = module.down_proj_bias if module.has_bias else None
        return module.gate_up_proj, module.down_proj, b13, b2
    key = (module.gate_up_proj.data_ptr(), module.gate_up_proj._version, module.down_proj._version)
    cache = getattr(module, "_moekit_converted", None)
    if cache is None or cache[0] != key:
        layout = FusedLayout(transposed=bool(module.is_transposed), interleaved=not module.is_concatenated)
        stacks = _expert_stacks(module, module.gate_up_proj.shape[0], module.has_bias, layout)
        cache = (key, tuple(t.detach() if t is not None else None for t in stacks))
        module._moekit_converted = cache
    return cache[1]


def moekit_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers experts forward on moekit: hidden_states [T, H], top_k_index [T, K] int,
    top_k_weights [T, K] float -> [T, H] (dtype of hidden_states)."""
    from ..ops.api import fused_experts

    if not getattr(self, "has_gate", True):
        raise NotImplementedError(f"experts_implementation='moekit': non-gated experts ({type(self).__name__})")
    if getattr(self, "has_post_expert_norm", False):
        raise NotImplementedError(f"experts_implementation='moekit': post-expert norm ({type(self).__name__})")
    if getattr(self, "_is_expert_parallel", False):
        raise NotImplementedError("experts_implementation='moekit' with transformers' expert parallelism")
    activation, limit = _experts_activation(self)
    w13, w2, b13, b2 = _experts_weights(self)
    return fused_experts(
        hidden_states,
        w13,
        w2,
        top_k_weights.float(),
        top_k_index,
        activation=activation,
        w1_bias=b13,
        w2_bias=b2,
        swiglu_limit=limit,
    )


def register(name: str = "moekit") -> str:
    """Register moekit in transformers' experts switch; returns ``name``, the value to pass as
    ``experts_implementation`` (``from_pretrained(..., experts_implementation="moekit")`` or
    ``model.set_experts_implementation("moekit")``).

    transformers keeps its router; moekit's :func:`~moekit.fused_experts` runs the experts on the
    block's own weights. The switch reaches the experts classes transformers decorates with
    ``@use_experts_implementation``: Mixtral, Qwen2-MoE, Qwen3-MoE, Qwen3-Next, DeepSeek-V2/V3/V4,
    GLM-4.5, OLMoE, gpt-oss. LongCat-Flash and Llama 4 have no such decorator: transformers runs their
    own experts forward whatever ``experts_implementation`` says. Call :func:`check_registered` on a
    model to make sure every MoE block runs moekit (it raises for those two); use :func:`patch` for them.
    Without transformers, ``ImportError``.
    """
    _require_transformers("register")
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(name, moekit_experts_forward)
    return name


def check_registered(model, name: str = "moekit") -> list[str]:
    """Check that transformers' experts switch really runs moekit in every MoE block of ``model``.

    Returns the module paths of the experts modules that call moekit. Raises ``ValueError`` when the
    model was not built with ``experts_implementation=name`` (or :func:`register` was not called), and
    ``NotImplementedError`` naming the MoE blocks the switch does not reach (LongCat-Flash, Llama 4:
    their experts classes are not decorated with ``@use_experts_implementation``, so transformers keeps
    their own forward) with the advice to use :func:`patch`.
    """
    _require_transformers("check_registered")
    from transformers.integrations.moe import ExpertsInterface

    if name not in ExpertsInterface():
        raise ValueError(f"experts implementation {name!r} is not registered; call register({name!r}) first")
    _spec, plans = plan_layers(_model_config_dict(model))
    by_idx = {p.layer_idx: p for p in plans}
    reached, unreached, other = [], [], []
    for path, module in model.named_modules():
        m = _BLOCK_RE.search(path)
        if m is None or int(m.group(1)) not in by_idx or not hasattr(module, "experts"):
            continue
        experts = module.experts
        if not all(hasattr(experts, a) for a in _SWITCH_ATTRS):
            unreached.append(f"{path} ({type(experts).__name__})")
            continue
        impl = getattr(getattr(experts, "config", None), "_experts_implementation", None)
        (reached if impl == name else other).append(f"{path}.experts")
    if unreached:
        raise NotImplementedError(
            f"transformers' experts switch does not reach {len(unreached)} MoE block(s) of "
            f"{type(model).__name__}: {', '.join(unreached[:4])}{' ...' if len(unreached) > 4 else ''}; their "
            f"experts class is not decorated with @use_experts_implementation, so experts_implementation="
            f"{name!r} is ignored there. Use moekit.integrations.transformers.patch(model) instead"
        )
    if other or not reached:
        impl = getattr(model.config, "_experts_implementation", None)
        raise ValueError(
            f"{type(model).__name__} runs experts_implementation={impl!r}, not {name!r}: load it with "
            f"from_pretrained(..., experts_implementation={name!r}) or call "
            f"model.set_experts_implementation({name!r})"
        )
    return reached
