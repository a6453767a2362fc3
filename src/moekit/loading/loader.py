"""``load_moe_layers(path)``: every MoE block of a local Hugging Face checkpoint as a moekit layer.

Reads ``config.json`` and ``*.safetensors`` (sharded through ``model.safetensors.index.json`` or not)
with the ``safetensors`` package only; transformers is not needed. Tensors are read one at a time and
copied into the layer being built, so peak memory is the layers' own size plus one checkpoint tensor.

Per layer the loader keeps its own state (:class:`_LayerLoad`): the plan, the fused layout it reads
stacks in, and the names of the non-expert parameters written; the experts record their own shards.
Nothing is stamped on the layer.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from ..experts.layout import PROJ_NAMES
from ..experts.mapping import load_layer_weights
from ..runner import MoERunner
from .architectures import ArchSpec, plan_layers, rename_block_key
from .modules import build_layer
from .plan import LayerPlan

_CONSTRUCTION = ("router.e_score_correction_bias", "router.hash_indices_table")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path!r} is not a checkpoint directory: {cfg_path} does not exist")
    with open(cfg_path) as f:
        return json.load(f)


def checkpoint_files(path: str) -> dict[str, str]:
    """key -> safetensors file, from ``model.safetensors.index.json`` or by listing every shard."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    from safetensors import safe_open

    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {path!r}")
    out = {}
    for name in files:
        with safe_open(os.path.join(path, name), framework="pt") as f:
            for k in f.keys():
                out[k] = os.path.join(path, name)
    return out


def _read(handle, key: str) -> torch.Tensor:
    """One tensor from an open safetensors file (a seam for tests that count live bytes)."""
    return handle.get_tensor(key)


def assign_keys(spec: ArchSpec, plans: list[LayerPlan], keys) -> dict[str, dict[str, str]]:
    """layer name -> {moekit-relative name: checkpoint key} for the keys of each planned block.

    A key belongs to a block when it starts with one of the block's ``ckpt_prefixes``; keys of dense
    layers, MTP layers past ``num_hidden_layers`` and other towers match none and are skipped."""
    by_prefix = {pre: plan for plan in plans for pre in plan.ckpt_prefixes}
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for key in keys:
        dot = key.find(".")
        while dot != -1:
            plan = by_prefix.get(key[: dot + 1])
            if plan is not None:
                out[plan.name][rename_block_key(spec, key[dot + 1 :])] = key
                break
            dot = key.find(".", dot + 1)
    return out


def _split_stack(spec: ArchSpec, plan: LayerPlan, rel: str, t: torch.Tensor):
    """``(rel, t)`` or, for a flat expert stack of ``spec.splits`` (``[E * I, H]``), its per-expert pieces."""
    for name, proj, transposed in spec.splits:
        if rel == name:
            if t.dim() != 2 or t.shape[0] % plan.num_experts:
                raise ValueError(f"has shape {list(t.shape)}, expected [{plan.num_experts} * I, H]")
            per = t.view(plan.num_experts, -1, t.shape[-1])
            return [(f"experts.{e}.{proj}.weight", per[e].T if transposed else per[e]) for e in range(len(per))]
    return [(rel, t)]


def load_moe_layers(path, *, device=None, dtype=None, backend: str = "auto") -> dict[str, "torch.nn.Module"]:
    """Build and load every MoE block of the checkpoint at ``path``.

    Returns ``{module path in the transformers model: MoERunner}`` in layer order, e.g.
    ``{"model.layers.1.mlp": layer, ...}``. Each layer maps ``x [T, H]`` (and ``input_ids [T]`` for
    DeepSeek-V4 hash layers) to the block's hidden output ``[T, H]``; where the transformers block
    returns a tuple (gpt-oss: ``(hidden, router_scores)``, Llama 4: ``(hidden, router_logits)``) this
    is element 0. ``dtype`` defaults to the checkpoint's ``dtype`` in config.json (router logits of
    DeepSeek-style routers are still computed in fp32, as transformers does).
    Errors: unsupported architecture -> ``NotImplementedError`` listing the supported ones; a missing
    tensor -> ``KeyError`` naming the key; a wrong shape -> ``ValueError`` naming the key and both shapes.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    config = read_config(path)
    spec, plans = plan_layers(config)
    if dtype is None:
        dtype = _DTYPES.get(str(config.get("dtype") or config.get("torch_dtype") or "float32"), torch.float32)
    device = torch.device(device) if device is not None else torch.device("cpu")
    files = checkpoint_files(path)
    assigned = assign_keys(spec, plans, files)
    handles: dict[str, object] = {}

    def read(key: str) -> torch.Tensor:
        f = files[key]
        if f not in handles:
            handles[f] = safe_open(f, framework="pt", device="cpu")
        return _read(handles[f], key)

    layers = {}
    for plan in plans:
        keys = assigned.get(plan.name, {})
        if not keys:
            raise KeyError(
                f"no checkpoint tensor for MoE block {plan.name} (looked for keys starting with "
                f"{' or '.join(plan.ckpt_prefixes)})"
            )
        construction = {}
        for rel in _CONSTRUCTION:
            if rel in keys:
                t = read(keys[rel])
                if rel == "router.e_score_correction_bias" and t.dim() == 2 and t.shape[0] == 1:
                    t = t[0]  # ERNIE-4.5 stores it per expert group: [1, E]
                construction[rel] = t
        _check_construction(plan, construction, keys)
        state = _LayerLoad(plan, build_layer(plan, device=device, dtype=dtype, backend=backend, tensors=construction))
        state.loaded.update(construction)
        del construction
        for rel, key in keys.items():
            if rel in _CONSTRUCTION:
                continue
            t = read(key)
            try:
                state.load([(r, x.to(device)) for r, x in _split_stack(spec, plan, rel, t)])
            except (KeyError, ValueError) as err:
                raise type(err)(f"{key}: {err.args[0] if err.args else err}") from None
            del t
        _check_complete(state, keys, spec)
        layers[plan.name] = state.layer
    return layers


@dataclass
class _LayerLoad:
    """The loader's state for one layer: its plan (hence the fused layout) and what was written."""

    plan: LayerPlan
    layer: MoERunner
    loaded: set = field(default_factory=set)  # names of non-expert parameters/buffers written

    def load(self, weights) -> set[str]:
        return load_layer_weights(self.layer, weights, fused_layout=self.plan.fused_layout, loaded=self.loaded)

    def missing(self) -> list[str]:
        """What a complete load still lacks: ``"expert 3 w2"``, ``"expert 0 w1 bias"``, ``"gate.weight"``..."""
        own = [n for n, _ in self.layer.named_parameters() if not n.startswith("routed_experts.")]
        return self.layer.routed_experts.missing() + [n for n in own if n not in self.loaded]


def _check_construction(plan: LayerPlan, tensors: dict, keys: dict) -> None:
    pre = plan.ckpt_prefixes[0]
    e_all = plan.num_experts + plan.num_zero_experts
    if plan.has_score_bias:
        t = tensors.get("router.e_score_correction_bias")
        if t is None:
            raise KeyError(f"missing checkpoint tensor {pre}gate.e_score_correction_bias (router selection bias, [{e_all}])")
        if tuple(t.shape) != (e_all,):
            raise ValueError(
                f"checkpoint key {keys['router.e_score_correction_bias']!r} has shape {list(t.shape)}, expected [{e_all}]"
            )
    if plan.hash_routing:
        t = tensors.get("router.hash_indices_table")
        if t is None:
            raise KeyError(f"missing checkpoint tensor {pre}gate.tid2eid (hash routing table, [vocab, {plan.top_k}])")
        if t.dim() != 2 or t.shape[1] != plan.top_k:
            raise ValueError(
                f"checkpoint key {keys['router.hash_indices_table']!r} has shape {list(t.shape)}, "
                f"expected [vocab, {plan.top_k}]"
            )


def _check_complete(state: _LayerLoad, keys: dict, spec: ArchSpec) -> None:
    plan = state.plan
    missing = state.missing()
    if not missing:
        return
    sample = next(iter(keys.values()))
    pre = next((p for p in plan.ckpt_prefixes if sample.startswith(p)), plan.ckpt_prefixes[0])
    mixtral_style = any(re.search(r"experts\.\d+\.w[123]\.", k) for k in keys)
    named = []
    for piece in missing[:8]:
        if piece.startswith("expert "):
            _, e, shard, *bias = piece.split()
            kind = "bias" if bias else "weight"
            a, b = PROJ_NAMES[shard]
            first, other = (b, a) if mixtral_style else (a, b)
            named.append(f"{pre}experts.{e}.{first}.{kind} (or experts.{e}.{other}.{kind}, or a fused stack)")
        else:
            for old, new in spec.renames:
                if piece.startswith(new):
                    piece = old + piece[len(new) :]
                    break
            named.append(pre + piece)
    more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
    raise KeyError(f"missing checkpoint tensors for MoE block {plan.name}: {', '.join(named)}{more}")
