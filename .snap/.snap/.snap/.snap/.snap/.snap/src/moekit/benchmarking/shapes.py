"""The one registry of model shapes used by ``moekit bench``, ``moekit tune`` and ``benchmarks/``.

A :class:`ModelShape` is the MoE block of one model: ``E`` real experts (+ ``Z`` zero experts), top
``K``, hidden ``H``, intermediate ``I`` (per expert), and its routing. :data:`MODELS` is read-only
(a ``MappingProxyType`` of frozen dataclasses): derive a variant with :meth:`ModelShape.replace`,
never by editing the registry.

    MODELS["longcat-flash"].replace(name="longcat-flash-nozero", Z=0)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from ..ops.activation import is_gated


@dataclass(frozen=True)
class ModelShape:
    """The MoE block of one model.

    E, Z, K, H, I: real experts, zero (identity) experts, experts per token, hidden, intermediate.
    scoring: "softmax" | "sigmoid"; groups / topk_group: DeepSeek grouped top-k (1 = ungrouped);
    sel_bias: a selection bias (``e_score_correction_bias``); renorm: renormalise the top-k weights;
    scale: ``routed_scaling_factor``; act: activation name; has_bias: expert biases (gpt-oss).
    """

    name: str
    E: int
    K: int
    H: int
    I: int  # noqa: E741 - the paper's name
    scoring: str = "softmax"
    Z: int = 0
    groups: int = 1
    topk_group: int = 1
    sel_bias: bool = False
    renorm: bool = True
    scale: float = 1.0
    act: str = "silu"
    has_bias: bool = False

    @property
    def gated(self) -> bool:
        """w13 holds gate and up rows (2I) for gated activations, I rows otherwise."""
        return is_gated(self.act)

    def replace(self, **changes) -> "ModelShape":
        """A copy with ``changes`` (the registry itself never changes)."""
        return dataclasses.replace(self, **changes)

    def bias_bytes(self, elt: int) -> int:
        """Bytes of one expert's biases (w13 ``[2I]`` or ``[I]``, w2 ``[H]``) at ``elt`` bytes, 0 without."""
        return ((2 if self.gated else 1) * self.I + self.H) * elt if self.has_bias else 0

    def layer_kwargs(self) -> dict:
        """Keyword arguments of ``moekit.FusedMoE`` for this routing (weights and bias excluded)."""
        kw = dict(renormalize=self.renorm, scoring_func=self.scoring, routed_scaling_factor=self.scale,
                  activation=self.act, has_bias=self.has_bias)
        if self.groups > 1:
            kw.update(use_grouped_topk=True, num_expert_group=self.groups, topk_group=self.topk_group)
        if self.Z:
            kw.update(zero_expert_type="identity")
        return kw


def _registry(*shapes: ModelShape) -> Mapping[str, ModelShape]:
    return MappingProxyType({s.name: s for s in shapes})


MODELS: Mapping[str, ModelShape] = _registry(
    ModelShape("deepseek-v3", E=256, K=8, H=7168, I=2048, scoring="sigmoid", groups=8, topk_group=4,
               sel_bias=True, scale=2.5),
    ModelShape("qwen3-30b-a3b", E=128, K=8, H=2048, I=768),
    ModelShape("mixtral-8x7b", E=8, K=2, H=4096, I=14336),
    ModelShape("gpt-oss-120b", E=128, K=4, H=2880, I=2880, act="swigluoai", has_bias=True),
    ModelShape("longcat-flash", E=512, Z=256, K=12, H=6144, I=2048, sel_bias=True, renorm=False, scale=6.0),
)

#: more shapes whose tuned configs moekit ships (models that run on one GPU in the format named), outside the
#: benchmark sweep (``--models all`` is :data:`MODELS`): ``moekit tune`` / ``bench --models`` accept their names, and
#: the GPU invariance tests run their shipped tables
EXTRA_MODELS: Mapping[str, ModelShape] = _registry(
    ModelShape("gpt-oss-20b", E=32, K=4, H=2880, I=2880, act="swigluoai", has_bias=True),  # bf16, mxfp4
    ModelShape("qwen3-next-80b-a3b", E=512, K=10, H=2048, I=512),  # fp8 (its official FP8 checkpoint)
    ModelShape("deepseek-v2-lite", E=64, K=6, H=2048, I=1408, renorm=False),  # bf16; Moonlight-16B-A3B's experts too
)

#: token counts of a default sweep
TOKENS = (1, 8, 64, 256, 1024, 4096, 16384)


def get_shape(name: str) -> ModelShape:
    """The registered shape ``name`` (:data:`MODELS` or :data:`EXTRA_MODELS`); ``KeyError`` naming the choices
    otherwise."""
    for registry in (MODELS, EXTRA_MODELS):
        if name in registry:
            return registry[name]
    raise KeyError(f"unknown model {name!r}; choose from {', '.join([*MODELS, *EXTRA_MODELS])}")
