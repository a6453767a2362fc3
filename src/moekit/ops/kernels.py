"""The kernel table: one backend's kernels, resolved once per layer and handed to its router and experts.

    kernels = resolve_kernels("auto", device)     # "torch" everywhere, "triton" on CUDA
    w, ids = kernels.route(logits, spec, bias, indices_type)
    out    = kernels.experts(x, w13, w2, w, ids, activation=..., ...)

Callers validate shapes, dtypes and devices once (the public fronts in :mod:`moekit.ops.api`, or a
layer at construction and in its forward); a table's functions only compute. ``checks_values`` says
whether the table raises on non-finite logits and out-of-range ids (the torch reference does, a host
synchronisation; the Triton kernels follow the NaN policy documented in :mod:`moekit.ops._triton.topk`,
and the input_ids policy of :mod:`moekit.ops.triton_routing`).

Quantised experts (SPEC §8) have their own op, ``experts_quant`` (the signature of
:func:`moekit.ops.experts_quant.fused_experts_quant_torch`), and ``quant_formats`` names the formats
(``fmt.name``) it runs. :meth:`Kernels.check_supports` raises ``NotImplementedError`` for any other,
so a layer refuses at construction; there is no fallback to another backend. The Triton table takes
``fused_experts_quant_triton`` and ``QUANT_FORMATS`` from :mod:`moekit.ops.triton_experts_quant`
when that module exists, else runs no quantised format.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from .._checks import check_device
from .experts import experts_reference
from .experts_quant import fused_experts_quant_torch
from .formats import Fp8BlockFormat, Fp8ChannelFormat, Int4GroupFormat, Mxfp4Format
from .grad import with_autograd
from .routing import hash_route_reference, route_reference
from .zero_experts import zero_combine_torch, zero_slots_torch

#: every format the torch twin runs
ALL_QUANT_FORMATS = frozenset(f.name for f in (Fp8BlockFormat, Fp8ChannelFormat, Mxfp4Format, Int4GroupFormat))

BACKENDS = ("auto", "torch", "triton")
log = logging.getLogger("moekit")


@dataclass(frozen=True)
class Kernels:
    """The ops of one backend.

    route(logits [T, E], spec: TopKSpec, bias [E] | None, indices_type, *, logits_name) -> (w [T, K] f32, ids [T, K])
    hash_route(logits [T, E], table [V, K] int, input_ids [T] int, spec, indices_type, *, ids_name, logits_name)
        -> (w, ids)   (``ids_name`` / ``logits_name``: the caller's names of the ids / logits in value errors;
        keyword-only, defaults ``"input_ids"`` / ``"router_logits"``: the public functions pass theirs)
    experts(x [T, H], w1, w2, topk_weights [T, K], topk_ids [T, K], *, activation,
            apply_router_weight_on_input, w1_bias, w2_bias, expert_map, swiglu_limit) -> [T, H]
    experts_quant(x [T, H], w13, w2, topk_weights, topk_ids, *, fmt, w13_scale, w2_scale,
            w13_input_scale, w2_input_scale, activation, apply_router_weight_on_input, w1_bias,
            w2_bias, expert_map, swiglu_limit, global_num_experts=-1[, packed_layout]) -> [T, H]   (None: no
            format; ``packed_layout`` only where ``packed_layouts`` has more than ``"spec"``)
    quant_formats: the ``fmt.name`` values ``experts_quant`` runs
    packed_layouts: the layouts of packed 4-bit words ``experts_quant`` reads: ``"spec"`` (SPEC §8), and on the
        Triton table ``"rega"`` (:mod:`moekit.ops.w4_layout`, which a layer then stores where it can)
    zero_slots(topk_weights, topk_ids, num_experts) -> (masked weights, masked ids, s [T] f32: zero slots' sum)
    zero_combine(routed [T, H], x [T, H] | None, s [T] f32 | None, scale: float) -> [T, H] routed's dtype
        (:mod:`moekit.ops.zero_experts`: LongCat-Flash's identity experts and the output scaling)
    check_format(fmt): raises ``NotImplementedError`` for an instance of a format in ``quant_formats`` this table
        cannot run (the Triton kernels: an fp8 ``block_k`` or int4 ``group_size`` that is no power of two); None: all
    route_limits: (most logit columns, most K) of ``route``'s kernel, None: none (:meth:`check_route`)

    The shipped tables are built through :func:`moekit.ops.grad.with_autograd` (gradients through every function);
    a table built by hand gets none unless wrapped the same way.
    """

    name: str
    route: Callable
    hash_route: Callable
    experts: Callable
    checks_values: bool
    experts_quant: Callable | None = None
    quant_formats: frozenset = frozenset()
    packed_layouts: frozenset = frozenset({"spec"})
    zero_slots: Callable = zero_slots_torch
    zero_combine: Callable = zero_combine_torch
    check_format: Callable | None = None
    route_limits: tuple[int, int] | None = None

    def __post_init__(self):
        # round 56 changed the zero-expert signatures; a table built for the old ones fails here, not at a forward
        for name, args in (("zero_slots", ("topk_weights", "topk_ids", "num_experts")),
                           ("zero_combine", ("routed", "x", "zero_scale", "scale"))):
            try:
                inspect.signature(getattr(self, name)).bind(*args)
            except TypeError:
                raise TypeError(f"Kernels({self.name!r}).{name} must take ({', '.join(args)}) (round 56: the zero "
                                "slots' weight sum [T] replaced the [T, H] zero output)") from None
            except ValueError:  # (no signature to read, e.g. some builtins: taken as is)
                pass

    def supports(self, fmt) -> bool:
        """True when ``fmt`` (a format object, or None for unquantised weights) runs on this table."""
        return fmt is None or (self.experts_quant is not None and fmt.name in self.quant_formats)

    def check_supports(self, fmt) -> None:
        """Raise ``NotImplementedError`` naming the format and backend unless :meth:`supports`, and where the
        table's ``check_format`` refuses this instance of a format it runs (e.g. an fp8 ``block_k`` that is no
        power of two on the Triton kernels): at construction, not at the first forward."""
        if not self.supports(fmt):
            have = sorted(self.quant_formats) or "none"
            raise NotImplementedError(
                f"quantised experts in format {fmt.name!r} ({fmt}) on the {self.name!r} backend: not implemented "
                f"(formats it runs: {have}); choose backend='torch' or another format"
            )
        if fmt is not None and self.check_format is not None:
            self.check_format(fmt)

    def check_route(self, num_experts: int, top_k: int, *, top_k_name: str = "top_k") -> None:
        """``NotImplementedError`` where this table's score-based routing kernel cannot hold ``num_experts``
        logit columns or ``top_k`` (``route_limits``: (most columns, most K)); routers check at construction,
        the public functions per call (``top_k_name``: the caller's name of ``top_k``)."""
        if self.route_limits is None:
            return
        most_e, most_k = self.route_limits
        if num_experts > most_e or top_k > most_k:
            raise NotImplementedError(
                f"the {self.name!r} routing kernel holds at most {most_e} experts per row and {top_k_name} <= "
                f"{most_k}, got E = {num_experts}, {top_k_name} = {top_k}; choose backend='torch'"
            )

    def __repr__(self) -> str:
        return f"Kernels({self.name!r})"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_unavailable_reason(device: torch.device) -> str | None:
    """None if the Triton kernels can run on ``device``, else why not."""
    if not triton_available():
        return "triton is not installed (pip install 'moekit[triton]')"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        # (not re-checked while compiling: the eager call or the layer's construction did; round 63: dynamo's trace
        # of the module scan diverged under dynamic=True)
        late = None if torch.compiler.is_compiling() else _compiled_for_gpu()
        if late is not None:
            return (f"TRITON_INTERPRET=1 was set after {late} imported, which made its @triton.jit functions GPU code "
                    "(Triton reads TRITON_INTERPRET when a function is defined, and the interpreter cannot call GPU "
                    "ones: the first forward would fail with \"Cannot call @triton.jit'd outside of the scope of a "
                    "kernel\"); set TRITON_INTERPRET=1 before triton is first imported (in the environment, or at "
                    "the top of the script / conftest.py, before importing triton, torch._inductor or moekit's "
                    "kernels)")
        return None  # the Triton interpreter (tests on CPU)
    return f"triton kernels need a CUDA device (or TRITON_INTERPRET=1 on CPU), got {device}"


#: modules whose ``@triton.jit`` functions an interpreted moekit kernel calls: Triton's own language library
#: (``tl.max``, ``tl.sum``, ... are ``@triton.jit`` functions of ``triton.language.standard``) and moekit's kernels
_KERNELS_WERE = "moekit's Triton kernels were"
_JIT_MODULES = (("triton.language.standard", "triton was"), ("moekit.ops._triton", _KERNELS_WERE)) + tuple(
    (f"moekit.ops._triton.{m}", _KERNELS_WERE)
    for m in ("align", "combine", "epilogue", "gate", "grouped_gemm", "quant", "rows", "tiles", "topk", "w4_decode",
              "zero"))


def _compiled_for_gpu() -> str | None:
    """What was imported without the interpreter (``"triton was"`` / ``"moekit's Triton kernels were"``), or None:
    a module of :data:`_JIT_MODULES` holds a GPU ``JITFunction`` (under ``TRITON_INTERPRET=1`` Triton defines an
    ``InterpretedFunction`` instead). Round 49 checked moekit's kernels; round 50 Triton's library too: ``import
    triton`` before setting ``TRITON_INTERPRET=1`` passed the check and failed inside the first forward's kernel
    ("Cannot call @triton.jit'd outside of the scope of a kernel", from ``tl.max``). Decision: refuse (at layer
    construction / at the op's call, ``RuntimeError`` from :func:`resolve_backend`) rather than rebuild Triton's
    library as interpreted functions, which would change process-wide Triton state that other code may use. A fixed
    list of modules (a dict lookup each), not a walk of ``sys.modules``: this runs per op call on CPU."""
    for name, what in _JIT_MODULES:
        module = sys.modules.get(name)
        if module is not None and any(type(v).__name__ == "JITFunction" for v in list(vars(module).values())):
            return what
    return None


def resolve_backend(backend: str, device, *, quiet: bool = False) -> str:
    """Return "torch" or "triton" for ``device``; an explicit backend that cannot run raises.

    backend: ``"auto"`` (Triton on CUDA when it can run, else torch), ``"torch"`` or ``"triton"``
    (``RuntimeError`` saying why when Triton cannot run on ``device``). device: a ``torch.device`` or
    string (None: CPU). quiet: do not log the choice ``"auto"`` made.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    device = check_device("device", device) if device is not None else torch.device("cpu")
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        if backend == "auto" and not quiet:
            log.info("moekit: backend='auto' chose 'torch' on %s", device)
        return "torch"
    reason = triton_unavailable_reason(device)
    if backend == "triton":
        if reason is not None:
            raise RuntimeError(f"backend='triton' cannot run: {reason}")
        return "triton"
    chosen = "triton" if reason is None and device.type == "cuda" else "torch"
    if not quiet:
        log.info("moekit: backend='auto' chose %r on %s", chosen, device)
    return chosen


def _torch_kernels() -> Kernels:
    return with_autograd(Kernels(
        "torch", route=route_reference, hash_route=hash_route_reference, experts=experts_reference,
        checks_values=True, experts_quant=fused_experts_quant_torch, quant_formats=ALL_QUANT_FORMATS))


def _triton_quant() -> tuple[Callable | None, frozenset]:
    """(launch_quant_experts: the unchecked entry, its QUANT_FORMATS) from :mod:`.triton_experts_quant`, or
    (None, {}). The table's functions only compute: inputs were checked at the public front / at load."""
    import importlib.util

    if importlib.util.find_spec(f"{__package__}.triton_experts_quant") is None:
        return None, frozenset()
    from . import triton_experts_quant as mod

    return mod.launch_quant_experts, mod.QUANT_FORMATS


def _triton_kernels() -> Kernels:
    # imported here: triton is an optional dependency
    from .quant_spec import QuantSpec
    from .triton_experts import fused_experts_triton
    from .triton_routing import MAX_EXPERTS, MAX_TOP_K, hash_route_triton, route_triton
    from .triton_zero import zero_combine_triton, zero_slots_triton

    experts_quant, formats = _triton_quant()
    return with_autograd(Kernels(
        "triton", route=route_triton, hash_route=hash_route_triton, experts=fused_experts_triton,
        checks_values=False, experts_quant=experts_quant, quant_formats=formats,
        packed_layouts=frozenset({"spec", "rega"}) if experts_quant is not None else frozenset({"spec"}),
        zero_slots=zero_slots_triton, zero_combine=zero_combine_triton, check_format=QuantSpec.of,
        route_limits=(MAX_EXPERTS, MAX_TOP_K)))


#: the tables built so far, by backend name: a plain dict, which ``torch.compile`` reads as a constant (round 63:
#: ``functools.lru_cache`` is traced through, into the table's construction, so a compiled ``fullgraph`` call of a
#: public function on the torch backend failed); "torch" is built here, "triton" (an optional import) at first use
_TABLES: dict[str, Kernels] = {}


def kernels_for(name: str) -> Kernels:
    """The table of a resolved backend name ("torch" or "triton"), built once."""
    table = _TABLES.get(name)
    if table is not None:
        return table
    if name not in ("torch", "triton"):
        raise ValueError(f"backend must be 'torch' or 'triton', got {name!r}")
    return _TABLES.setdefault(name, _torch_kernels() if name == "torch" else _triton_kernels())


def resolve_kernels(backend: str, device, *, quiet: bool = False) -> Kernels:
    """:func:`resolve_backend` then the table of that backend."""
    return kernels_for(resolve_backend(backend, device, quiet=quiet))


kernels_for("torch")  # (built at import: a first call while compiling finds it in ``_TABLES``)
