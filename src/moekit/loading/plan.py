"""LayerPlan: everything needed to build one moekit layer equal to one transformers MoE block."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.activation import is_gated


@dataclass(frozen=True)
class LayerPlan:
    """One MoE block of a checkpoint.

    name: the block's module path in the transformers model (``model.layers.3.mlp``).
    ckpt_prefixes: key prefixes of this block in checkpoints (``model.layers.3.block_sparse_moe.``...).
    output: what the transformers block returns: ``"hidden"`` (a tensor), ``"hidden_scores"``
    (gpt-oss: ``(hidden, topk_weights [T, K])``; ``"hidden_scores_over_k"``: the weights divided by K,
    OpenAI privacy filter) or ``"hidden_logits"`` (Llama 4: ``(hidden [T, H], router_logits [T, E])``);
    a moekit layer returns the hidden output (element 0).
    custom_routing / custom_routing_arg: a named routing of :mod:`moekit.loading.routings` and its
    parameter (PhiMoE's jitter eps, DBRX's p of the p-norm).
    shared_scale: the shared expert's output is multiplied by it (Cohere2-MoE's "average": 0.5, with
    ``routed_scaling_factor=0.5``). JetMoE's ``[H]`` bias added once to the routed sum is the
    ``output_transform="bias"`` module kind (:mod:`moekit.loading.blocks`).
    gate_fp32_dtypes: the load dtypes (``"bfloat16"``, ``"float16"``) in which transformers keeps the router gate's
    weight in float32 (:mod:`moekit.loading.archs.gate_dtypes`); in them the gate's weight is float32 and the gate
    computes in float32 (:func:`moekit.loading.modules.plan_gate`).
    """

    name: str
    layer_idx: int
    ckpt_prefixes: tuple[str, ...]
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    routing: str  # human-readable routing kind, for ``moekit inspect``
    scoring_func: str = "softmax"
    renormalize: bool = True
    routed_scaling_factor: float = 1.0
    num_expert_group: int | None = None
    topk_group: int | None = None
    has_score_bias: bool = False
    hash_routing: bool = False
    custom_routing: str | None = None
    custom_routing_arg: float | None = None
    apply_router_weight_on_input: bool = False
    num_zero_experts: int = 0
    activation: str = "silu"
    swiglu_limit: float | None = None
    has_bias: bool = False
    router_bias: bool = False
    router_fp32: bool = False
    gate_fp32_dtypes: tuple[str, ...] = ()  # load dtypes in which the gate weight stays float32 (transformers)
    shared_intermediate_size: int = 0
    shared_expert_gate: bool = False
    shared_activation: str = "silu"
    shared_swiglu_limit: float | None = None
    shared_scale: float = 1.0
    fused_layout: str = "rows"
    output: str = "hidden"
    needs_input_ids: bool = False
    # issue #13 extensions (see moekit.FusedMoE and loading/blocks.py for the module kinds)
    block_hidden_size: int | None = None  # width of the block's input when the experts run on a latent
    gate_kind: str = "linear"  # "linear" (RouterLinear) or "rmsnorm" (Gemma 4: norm, scale, proj)
    logit_scale: float | None = None  # gate logits *= scale (Muse Spark's output_multiplier)
    logit_softcap: float | None = None  # gate logits = c·tanh(logits / c) (Laguna)
    gate_input: str = "routed"
    apply_routed_scale_to_output: bool = False
    zero_score_bias: bool = False  # a zero selection bias (Mistral 4: grouped by the top-2 sum, no bias)
    routed_shared_experts: int = 0  # the last S experts are shared, router-weighted (Inkling)
    input_transform: str | None = None  # routed_input_transform kind
    output_transform: str | None = None  # routed_output_transform kind
    final_transform: str | None = None  # final_output_transform kind
    expert_output_norm: str | None = None
    norm_eps: float = 1e-6
    expert_norm_eps: float = 1e-6
    shared_fused: bool = False  # the shared MLP has one gate_up_proj (MiniMax-M3-VL)
    shared_output_norm: bool = False  # an RMSNorm [H] (eps norm_eps) on the shared MLP's output (Ergo)
    shared_bias: bool = False  # every linear of the shared MLP has a bias (Aria / Nemotron-H with mlp_bias=True)

    @property
    def outer_hidden_size(self) -> int:
        """Width of the block's input and output (``hidden_size`` unless the experts run on a latent)."""
        return self.block_hidden_size or self.hidden_size

    def gate_dtype(self, dtype):
        """The dtype of the router gate's weight in a layer loaded in ``dtype`` (a ``torch.dtype``): float32 where
        transformers keeps it so (:attr:`gate_fp32_dtypes`), else ``dtype``."""
        return torch.float32 if str(dtype).removeprefix("torch.") in self.gate_fp32_dtypes else dtype

    @property
    def num_shared_experts_width(self) -> int:
        return self.shared_intermediate_size

    def expert_bytes(self, bytes_per_el: int = 2) -> int:
        """Bytes of one routed expert (w13 + w2, + biases) at ``bytes_per_el``."""
        rows = 2 * self.intermediate_size if is_gated(self.activation) else self.intermediate_size
        n = rows * self.hidden_size + self.hidden_size * self.intermediate_size
        if self.has_bias:
            n += rows + self.hidden_size
        return n * bytes_per_el

    def shared_bytes(self, bytes_per_el: int = 2) -> int:
        """Bytes of the shared MLP (gate, up, down; + their biases; no gate for a non-gated activation: round 65,
        relu2's was counted with one) at ``bytes_per_el``."""
        h, i = self.outer_hidden_size, self.shared_intermediate_size
        rows = 2 * i if is_gated(self.shared_activation) else i
        return (rows * h + i * h + (rows + h if self.shared_bias and i else 0)) * bytes_per_el

    def router_bytes(self, bytes_per_el: int = 2) -> int:
        """Bytes of the router gate at ``bytes_per_el``: its weight ``[E + Z, W]`` (W: the width it reads, the block's
        input for ``gate_input="block"``), its bias ``[E + Z]`` (gpt-oss) and Gemma 4's scale ``[W]`` (round 67: the
        bias was left out)."""
        width = self.outer_hidden_size if self.gate_input == "block" else self.hidden_size
        e_all = self.num_experts + self.num_zero_experts
        return (e_all * width + (e_all if self.router_bias else 0) + (width if self.gate_kind == "rmsnorm" else 0)) \
            * bytes_per_el

    def active_bytes_per_token(self, bytes_per_el: int = 2, gate_bytes: int | None = None) -> int:
        """Expert weight bytes one token touches: K routed experts + the shared expert + the router, this at
        ``gate_bytes`` per element (default ``bytes_per_el``; round 67: a gate the layer holds in float32,
        :meth:`gate_dtype`, was counted at the experts' 2 bytes)."""
        router = self.router_bytes(bytes_per_el if gate_bytes is None else gate_bytes)
        return self.top_k * self.expert_bytes(bytes_per_el) + self.shared_bytes(bytes_per_el) + router
