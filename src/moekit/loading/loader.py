"""``load_moe_layers(path)``: every MoE block of a local Hugging Face checkpoint as a moekit layer.

Reads ``config.json`` and ``*.safetensors`` (sharded through ``model.safetensors.index.json`` or not) with the
``safetensors`` package only; transformers is not needed. Every layer is built first (weights allocated, not
initialised); then each file is opened once and its tensors are read in storage order, one at a time, each copied
straight into its slot, so peak memory is the layers' own size plus one checkpoint tensor. A tqdm bar shows the
bytes read (``progress=``). Per layer the loader keeps its own state (:class:`_LayerLoad`): the plan, the fused
layout it reads stacks in, and the names of the non-expert parameters written; the experts record their own
shards. Nothing is stamped on the layer.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

from .._checks import as_float_dtype, check_bool, check_device
from ..experts.graphed import GraphPool
from ..experts.layout import PROJ_NAMES
from ..experts.mapping import EXPERT_KEY_RE, LayerKeys, is_slot_tensor, load_layer_weights
from ..parallel.comm import check_group
from ..parallel.sync import SettingsDiffer, fail_together
from ..runner import MoERunner
from .architectures import ArchSpec, checkpoint_block_key, plan_layers, raw_text_config
from .duplicates import check_duplicate_experts, check_duplicate_own
from .fields import construction_error
from .files import checkpoint_files, config_dtype, read_config
from .keys import (CONSTRUCTION, assign_keys, check_construction, check_not_transposed, construction_tensors,
                   expand_key, field_hint, zero_width_shared_gate)
from .modules import build_layer
from .plan import LayerPlan
from .quant import check_shipped_weight, checkpoint_formats, dense_groups, dequantize_dense, experts_format
from .quant_shared import (quant_shared_from_checkpoint, quant_shared_from_float, shared_format, shared_groups,
                           shared_projs)
from .reader import Reader, one_thread, progress_bar


def load_moe_layers(
    path, *, device=None, dtype=None, backend: str = "auto", quant_config=None, progress: bool | None = None,
    eager_graph_tokens: int | None = None, ep_group=None, tp_group=None, expert_placement_strategy: str = "linear",
    enable_eplb: bool = False, num_redundant_experts: int = 0,
) -> dict[str, "torch.nn.Module"]:
    """Build and load every MoE block of the checkpoint at ``path`` (a directory holding ``config.json`` and
    ``*.safetensors``, sharded through ``model.safetensors.index.json`` or not; ``model.safetensors`` beside an index is
    read, not the index, as transformers reads them).

    Args:
        path: the checkpoint directory (``str``, ``bytes`` or ``os.PathLike``).
        device: where the layers' weights live (default CPU). Tensors are copied from the files straight
            into the layers' parameters on that device.
        dtype: dtype of the weights (``torch.float32``, ``torch.bfloat16``, ``torch.float16``); default:
            the ``dtype`` (or ``torch_dtype``) in config.json, else float32. Router logits of
            DeepSeek-style routers are still computed in fp32, their gate weights stay fp32 where transformers keeps
            them (:mod:`moekit.loading.archs.gate_dtypes`) and selection biases stay fp32, as in
            transformers. For quantised experts it is the activation dtype.
        backend: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"torch"`` or ``"triton"``.
        quant_config: None (default: the experts as the checkpoint ships them) or an HF
            ``quantization_config`` dict / format object: quantise a full-precision checkpoint's experts
            while loading, one tensor at a time.
        progress: a tqdm progress bar over the bytes read, on stderr. ``None`` (default): shown when
            stderr is a terminal; ``True``: always; ``False``: never.
        eager_graph_tokens: the layers' internal CUDA-graph limit (see :class:`~moekit.MoERunner`); None
            (default): :data:`~moekit.experts.graphed.MODEL_GRAPH_TOKENS` (2048). The layers share one
            :class:`~moekit.experts.graphed.GraphPool`.
        ep_group, tp_group, expert_placement_strategy, enable_eplb, num_redundant_experts: expert / tensor
            parallelism and EPLB, as :func:`moekit.FusedMoE` takes them (SPEC §5; default: single-process layers).
            Each rank keeps its experts (EP) or its slice of every expert (TP; quantised slices on block
            boundaries, else ``ValueError``); shared experts are replicated. A rank reads its own experts' tensors
            of a per-expert checkpoint (``experts.{e}....``; static input scales of every expert: their max),
            fused expert stacks whole (one tensor at a time). An error on some ranks only (a missing or malformed
            expert tensor, read by the ranks that hold the expert; a rank's own damaged copy of config.json or of
            any tensor; a failed read or allocation) raises on those ranks; the other ranks of ``ep_group`` /
            ``tp_group`` then raise ``RuntimeError`` (``PeerFailed``) naming those ranks and their errors (one object
            all-gather per group before each layer is built and after the last tensor, every call, and FusedMoE's
            agreement of the ranks' settings; :mod:`moekit.parallel.sync`), so no rank waits for a peer that has
            failed. Checkpoints with different numbers of MoE layers: every rank raises ``PeerFailed``. Layers built
            with different settings: the ranks that see the difference raise ``ValueError`` (``SettingsDiffer``),
            the others ``SettingsDiffer`` or ``PeerFailed``. One pass reaches every rank where the groups form a
            grid (every EP group meets every TP group), as FusedMoE's placement assumes.


    Returns ``{module path in the transformers model: MoERunner}`` in layer order, e.g.
    ``{"model.layers.1.mlp": layer, ...}``. Each layer maps ``x [T, H]`` (and ``input_ids [T]`` for
    DeepSeek-V4 hash layers) to the block's hidden output ``[T, H]``; where the transformers block
    returns a tuple (gpt-oss: ``(hidden, router_scores)``, Llama 4: ``(hidden, router_logits)``) this
    is element 0. Only the blocks of layers ``< num_hidden_layers`` are returned: DeepSeek's
    multi-token-prediction layers stored past them (``model.layers.{num_hidden_layers}...``) are skipped,
    as are dense layers.

    Quantised checkpoints (SPEC §8) load as they ship: config.json's ``quantization_config`` gives the
    format (fp8 block, compressed-tensors fp8 channel / tensor / block, mxfp4, int4 groups; DeepSeek-V4's fp8
    with ``expert_dtype "fp4"``: mxfp4 routed experts, fp8 block shared experts; see :mod:`moekit.loading.quant`
    and :func:`moekit.experts.mapping.load_layer_weights` for the key forms) and the routed experts keep it
    (``layer.routed_experts.quant``). Routers, gates and selection biases stay in full precision. Shared experts
    of an fp8 checkpoint (block, channel, tensor) stay fp8: ``layer.shared_experts`` is a
    :class:`~moekit.loading.quant_shared.QuantSharedMLP`, one expert with K = 1 through the routed experts'
    quantised kernel; with ``quant_config=`` an fp8 format that applies to the shared experts (not ``ignore``-d)
    quantises them on load too (:func:`moekit.quantize_experts` on the stacked weights), so every expert is in
    the format. Other quantised dense linears (and shared experts of mxfp4 / int4 checkpoints) are dequantised
    into ``dtype``.


    Each file is opened once and read in storage order; every tensor is read once and copied into its
    slot of the preallocated (unset) weights, so peak memory is the layers' own size plus one
    checkpoint tensor. While it copies, the loading thread's intra-op thread count is 1 (many small memory-bound
    copies run several times faster so); it is restored after that thread's last overlapping load. A thread that first
    uses torch while a load runs starts with 1 intra-op thread (torch's default for new threads then) and keeps it:
    call ``torch.set_num_threads(n)`` in such threads (a server starting request threads during a load).

    Errors: unsupported architecture -> ``NotImplementedError`` listing the supported ones; a missing
    tensor -> ``KeyError`` naming the key (and the config fields that decide whether it exists); a wrong shape ->
    ``ValueError`` naming the key and both shapes; ``quant_config=`` a static-input fp8 format for a
    full-precision checkpoint (its input scales are calibrated, not made on load) -> ``ValueError``; an
    unreadable config.json, index or shard -> ``ValueError`` naming the file; a path without config.json or
    ``*.safetensors`` -> ``CheckpointNotFoundError`` (a ``ValueError`` and a ``FileNotFoundError``). Fields
    config.json lacks take the defaults of the architecture's transformers config class
    (:mod:`moekit.loading.archs.config_defaults`); a field with a wrong value, one the class has no default for
    (``hidden_size`` ...), or a ``dtype`` that is no float dtype -> ``ValueError`` naming the file and the field; fields
    no layer can be built from (``topk_group`` > ``n_group``...) -> ``ValueError`` naming the file, block and fields;
    ``device="cuda"`` without a CUDA device -> ``ValueError``; an unknown ``dtype`` (a float ``torch.dtype`` or its
    name: "bf16", "bfloat16", "fp16", "float32"...) -> ``TypeError``; ``device="meta"`` (no data to copy into) ->
    ``ValueError``; a ``path`` that is no str or path -> ``TypeError``; one routed-expert tensor stored under two keys
    (``experts.5.gate_proj.weight`` and ``experts.5.w1.weight``, or a fused stack) -> ``ValueError`` naming both.
    """
    try:
        path = os.fsdecode(path)  # (bytes too, as os.path takes them: round 68's audit)
    except TypeError:
        raise TypeError(f"path must be a checkpoint directory (str, bytes or os.PathLike), got {type(path).__name__}: "
                        f"{path!r:.80}") from None
    if progress is not None:
        check_bool("progress", progress)
    device = check_device("device", device) if device is not None else torch.device("cpu")
    if device.type == "meta":  # (round 52's audit: layers "loaded" without data, whose forward failed later)
        raise ValueError("device='meta' holds no data, and load_moe_layers copies the checkpoint's tensors into the "
                         "layers: load on 'cpu' or 'cuda' (moekit inspect shows a checkpoint's layout without weights)")
    dtype = as_float_dtype("dtype", dtype) if dtype is not None else None
    check_group("ep_group", ep_group)  # (before the first sync over them; the same check on every rank)
    check_group("tp_group", tp_group)
    parallel = dict(ep_group=ep_group, tp_group=tp_group, expert_placement_strategy=expert_placement_strategy,
                    enable_eplb=enable_eplb, num_redundant_experts=num_redundant_experts)  # (FusedMoE checks the rest)
    # A rank's failure is told to the ranks of both groups at the next sync (fail_together: one object all-gather per
    # group): before each layer's construction-time collectives (FusedMoE's agreement of the ranks' settings) and after
    # the last tensor. A rank's own copy of the checkpoint, its reads or its allocations may fail where its peers'
    # do not (round 52's audit: a damaged selection bias, shared-expert scale or config.json on one rank left the
    # others waiting in the next collective until the group's timeout), so every step runs under one of the syncs.
    # A failure inside build_layer before FusedMoE's own agreement (allocating the gate or the shared MLP) sends the
    # rank to its last sync, which its peers meet inside that agreement (parallel.sync: one payload for both): they
    # raise PeerFailed there, marked synced, and leave without another sync. (Checks before the first sync, e.g. a
    # device index one node lacks, still raise on that rank alone.)
    what, groups = f"load_moe_layers({path!r})", (ep_group, tp_group)
    states: dict[str, _LayerLoad] = {}
    failure, opened = _attempt(lambda: _open(path, quant_config, dtype))
    try:
        if failure is None:
            spec, plans, fmt, dense_fmt, shipped, dtype, assigned, source, reader = opened
            done: set[str] = set()  # keys already consumed (quantised dense groups)
            pool = GraphPool()  # the layers' internal CUDA graphs share one memory pool (run one after another)
            for plan in plans:
                failure, got = _attempt(lambda: _construction(plan, assigned, reader, source, spec))
                fail_together(what, failure, groups, where=plan.name)
                keys, construction = got

                def build():  # (a synced failure, every rank's in FusedMoE's agreement, leaves no sync: re-raised)
                    try:
                        layer = build_layer(plan, device=device, dtype=dtype, backend=backend, tensors=construction,
                                            quant_config=experts_format(fmt, plan), graph_pool=pool,
                                            eager_graph_tokens=eager_graph_tokens, parallel=parallel)
                    except ValueError as err:  # (round 55: "topk_group must be <= ..." named no file, block, field)
                        if isinstance(err, SettingsDiffer):  # every rank's, in one exchange: named, still synced
                            raise SettingsDiffer(f"{source[0]}: {plan.name}: {err}") from err
                        if getattr(err, "synced", False):
                            raise
                        raise construction_error(err, plan, *source) from err
                    state = states[plan.name] = _LayerLoad(plan, layer)
                    check_duplicate_own(spec, plan, keys, layer, reader.read)  # (round 69: before its tensors are read)
                    state.loaded.update(construction)  # (and a plan's own zero bias: no checkpoint's tensor)
                    state.loaded.update(("router.e_score_correction_bias",) if plan.zero_score_bias else ())
                    done.update(_dense(spec, state, dense_fmt, shipped, keys, reader, device))

                failure, _ = _attempt(build)
                if failure is not None:
                    break
            if failure is None:
                failure, _ = _attempt(lambda: _read_tensors(spec, assigned, states, done, reader, progress, shipped))
    finally:
        if opened is not None:
            opened[-1].close()
    fail_together(what, failure, groups, where="end")
    return {name: state.layer for name, state in states.items()}


def _attempt(fn) -> tuple[BaseException | None, object]:
    """(None, ``fn()``), or (its error, None): a step whose error the ranks learn together at the next sync
    (:func:`~moekit.parallel.sync.fail_together`); an error marked ``synced`` (every rank raised it in one exchange,
    FusedMoE's agreement) is raised at once, as no sync is left for it."""
    try:
        return None, fn()
    except Exception as err:  # noqa: BLE001 - re-raised by fail_together, here and (as PeerFailed) at the peers
        if getattr(err, "synced", False):
            raise
        return err, None


def _open(path: str, quant_config, dtype):
    """(spec, plans, routed-experts format, dense format, shipped, dtype, {layer: {rel: key}}, (config.json path,
    its dict of the blocks' fields), Reader) of the checkpoint at ``path``."""
    config, source = read_config(path), os.path.join(path, "config.json")
    spec, plans = plan_layers(config, source)
    fmt, dense_fmt, shipped = checkpoint_formats(config, quant_config)  # routed experts; other linears
    if dtype is None:
        dtype = config_dtype(config, source, raw_text_config(config))
    files = checkpoint_files(path)
    assigned = assign_keys(spec, plans, files)
    return spec, plans, fmt, dense_fmt, shipped, dtype, assigned, (source, raw_text_config(config)), Reader(files)


def _dense(spec, state, dense_fmt, shipped: bool, keys: dict, reader, device) -> set[str]:
    """The block's quantised dense linears: an fp8 shared MLP kept fp8 (:func:`_quant_shared`), the others
    dequantised into the layer; the keys consumed."""
    plan = state.plan
    dense = dense_groups(keys) if shipped else {}
    done = _quant_shared(spec, state, dense_fmt, shipped, keys, dense, reader, device)
    for mod, parts in dense.items():  # other quantised dense linears: dequantised
        check_not_transposed(spec, f"{plan.name}.{mod}", parts.values())
        w = dequantize_dense({part: reader.read(k) for part, k in parts.items()}, dense_fmt, f"{plan.name}.{mod}")
        _load_one(state, f"{mod}.weight", w.to(device), parts.get("weight", parts.get("weight_packed")))
        done = done | set(parts.values())
    return done


def _construction(plan: LayerPlan, assigned: dict, reader, source=None, spec=None) -> tuple[dict, dict]:
    """The block's ``{relative name: checkpoint key}`` (less the gate of a zero-width shared expert) and the tensors
    its layer takes at construction (checked)."""
    keys = assigned.get(plan.name, {})
    if not keys:
        raise KeyError(
            f"no checkpoint tensor for MoE block {plan.name} (looked for keys starting with "
            f"{' or '.join(plan.ckpt_prefixes)})"
        )
    sizes = {rel: reader.nbytes(k) for rel, k in keys.items() if rel.startswith("shared_expert")}  # 0: empty
    for rel in [r for r in keys if zero_width_shared_gate(plan, r, sizes)]:
        del keys[rel]  # the gate of a zero-width shared expert: adds nothing (the empty MLP is skipped too)
    check_duplicate_experts(spec, plan, keys)  # (before any expert tensor is read: round 68, the last one read won)
    # copies (small): the file's mapping otherwise lived on in the layer's buffers, and a rewritten shard changed the
    # routing (round 66)
    construction = construction_tensors({rel: reader.read(k).clone() for rel, k in keys.items() if rel in CONSTRUCTION})
    check_construction(plan, construction, keys, source, spec)
    return keys, construction


def _read_tensors(spec, assigned: dict, states: dict, done: set, reader, progress, shipped: bool) -> None:
    """Every other tensor, in storage order, checked (:func:`.check_shipped_weight`) into its layer; each complete."""
    todo = [(key, states[name], rel) for name, keys in assigned.items() for rel, key in keys.items()
            if rel not in CONSTRUCTION and key not in done and not states[name].elsewhere(rel)]
    todo.sort(key=lambda item: reader.position(item[0]))
    total = sum(reader.nbytes(key) for key, _, _ in todo)
    with progress_bar(total, progress) as bar, one_thread():
        for n, (key, state, rel) in enumerate(todo):
            if n and reader.files[todo[n - 1][0]] != reader.files[key]:
                reader.release(reader.files[todo[n - 1][0]])  # (storage order: never read again)
            t = reader.read(key)
            bar.update(t.numel() * t.element_size())
            x = None
            for piece, x in expand_key(spec, state.plan, rel, t, key):
                check_shipped_weight(state.layer, piece, x, key, reader.files[key], shipped)
                _load_one(state, piece, x, key, rel)
            del t, x  # nothing of this tensor lives on while the next one is read
    for name, state in states.items():
        _check_complete(state, assigned[name], spec)


def _quant_shared(spec, state, fmt, shipped: bool, keys: dict, dense: dict, reader, device) -> set[str]:
    """Replace ``state.layer.shared_experts`` by a :class:`~.quant_shared.QuantSharedMLP` where the shared
    MLP loads in fp8 (a shipped fp8 shared MLP; or quantise-on-load to an fp8 format that applies to it);
    the keys consumed (removed from ``dense``). Anything else: nothing done (dequantised / full precision)."""
    plan, layer = state.plan, state.layer
    kernels = layer.routed_experts.kernels
    if fmt is None or layer.shared_experts is None or not kernels.supports(fmt):
        return set()
    what = f"{plan.name}.shared_experts"
    if shipped:
        groups = shared_groups(dense, plan, fmt)
        if groups is None:
            return set()
        for proj, parts in groups.items():
            check_not_transposed(spec, f"{what}.{proj}", parts.values())
        tensors = {proj: {part: reader.read(k) for part, k in parts.items()} for proj, parts in groups.items()}
        try:
            mod = quant_shared_from_checkpoint(plan, fmt, tensors, groups, kernels=kernels, device=device)
        except (KeyError, ValueError, TypeError) as err:
            raise type(err)(f"{what}: {err.args[0] if err.args else err}") from None
        if mod is None:
            return set()
        used = {k for parts in groups.values() for k in parts.values()}
        for proj in groups:
            dense.pop(f"shared_experts.{proj}")
    else:
        rels = {proj: f"shared_experts.{proj}.weight" for proj in shared_projs(plan)}
        if not all(rel in keys for rel in rels.values()):
            return set()  # incomplete: the missing keys are reported after loading
        if shared_format(fmt, plan, lambda rel: keys[rel + ".weight"].removesuffix(".weight")) is None:
            return set()
        floats = {p: expand_key(spec, plan, rel, reader.read(keys[rel]), keys[rel])[0][1] for p, rel in rels.items()}
        mod = quant_shared_from_float(plan, fmt, floats, kernels=kernels, device=device)
        used = {keys[rel] for rel in rels.values()}
    if mod is None:
        return set()
    mod.norm = getattr(layer.shared_experts, "norm", None)  # an output norm (Ergo) loads from the dense keys
    layer.shared_experts = mod
    return used


def _load_one(state, rel: str, t: torch.Tensor, key: str, what: str | None = None) -> None:
    """Load one piece; an error names the checkpoint ``key`` and, for a tensor the layer has no place for, the
    config fields likely behind it (``what``: the key's block-relative moekit name)."""
    name = what or rel
    try:
        state.load([(rel, t)])
    except (KeyError, ValueError, TypeError) as err:
        msg = f"{key}: {err.args[0] if err.args else err}"
        hint = field_hint(state.plan, name) if isinstance(err, KeyError) else ""
        raise type(err)(msg + (f"; the config.json fields likely responsible: {hint}" if hint else "")) from None


@dataclass
class _LayerLoad:
    """The loader's state for one layer: its plan (hence the fused layout), what was written, and what its one-key
    calls of :func:`load_layer_weights` share (:class:`~moekit.experts.mapping.LayerKeys`)."""

    plan: LayerPlan
    layer: MoERunner
    loaded: set = field(default_factory=set)  # names of non-expert parameters/buffers written
    _here: frozenset | None = None  # the logical experts this rank's slots hold (:meth:`elsewhere`)
    # the mapping's index, made once for the layer (per call: O(E²) a layer), and what a non-gated expert received
    # (round 67: kept here, not on the layer by the mapping's identity, nor in ``loaded``)
    keys: LayerKeys = field(init=False)

    def __post_init__(self):
        self.keys = LayerKeys(self.layer)

    def load(self, weights) -> set[str]:
        return load_layer_weights(self.layer, weights, fused_layout=self.plan.fused_layout, loaded=self.loaded,
                                  _keys=self.keys)

    def elsewhere(self, rel: str) -> bool:
        """``rel`` is a per-expert tensor (``experts.{e}.{proj}.{part}``) of an expert no slot of this rank holds
        (expert parallelism): it is not read (round 51: each of W ranks reads about 1 / W of a per-expert checkpoint's
        expert bytes; fused stacks hold every expert and are read whole)."""
        p = self.layer.routed_experts.placement
        if p.ep_size == 1:  # (tensor parallelism alone: every expert, a slice of each)
            return False
        m = EXPERT_KEY_RE.search(rel)
        if m is None or m.group(4) == "input_scale":  # (static fp8: every slot takes the max over ALL experts)
            return False
        if self._here is None:
            self._here = frozenset(p.local_logical_ids())
        return int(m.group(2)) not in self._here

    def missing(self) -> list[str]:
        """What a complete load still lacks: ``"expert 3 w2"``, ``"expert 0 w1 bias"``, ``"gate.weight"``..."""
        own = [n for n, _ in self.layer.named_parameters() if not is_slot_tensor(self.layer, n)]
        own += router_buffers(self.layer)  # (round 65: a named routing's selection bias buffer was left zero)
        return self.layer.routed_experts.missing() + [n for n in own if n not in self.loaded]


def router_buffers(layer) -> list[str]:
    """Names of the persistent buffers (those of its ``state_dict``) of ``layer``'s router and its children (a named
    routing's selection bias: LFM2-MoE, Kolibri-1). (Quantised shared experts' buffers are checked by their loader.)"""
    return [f"router.{m}.{b}" if m else f"router.{b}" for m, mod in layer.router.named_modules()
            for b, t in mod._buffers.items() if t is not None and b not in mod._non_persistent_buffers_set]


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
            _, e, shard, *rest = piece.split()
            kind = {"scale": "weight_scale_inv or weight_scale"}.get(rest[0], rest[0]) if rest else "weight"
            a, b = PROJ_NAMES[shard]
            first, other = (b, a) if mixtral_style else (a, b)
            named.append(f"{pre}experts.{e}.{first}.{kind} (or experts.{e}.{other}.{kind}, or a fused stack)")
        else:
            named.append(pre + checkpoint_block_key(spec, piece))
    more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
    hints = list(dict.fromkeys(h for h in (field_hint(plan, piece) for piece in missing[:8]) if h))
    why = f"; the config.json fields likely responsible: {'; '.join(hints)}" if hints else ""
    raise KeyError(f"missing checkpoint tensors for MoE block {plan.name}: {', '.join(named)}{more}{why}")
