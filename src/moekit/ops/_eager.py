"""When a Triton launcher may skip its ``torch.library`` custom op (the eager host-time fast path).

A custom op call costs a dispatcher round trip (boxing every argument, an aliasing check on the
result): measured ~40 µs per call on a slow CPU host, against ~3 µs for calling the Python launcher
directly (``benchmarks/host_overhead_cpu.py``). Both run the same launcher, so the output is the same
bit for bit; the op stays the path that torch.compile / torch.export trace, that fake tensors and
dispatch modes see, and that ``torch.library.opcheck`` tests.
"""

from __future__ import annotations

import functools

import torch

_dispatch_depth = getattr(torch._C, "_len_torch_dispatch_stack", None)


def direct_call_ok(t: torch.Tensor) -> bool:
    """True for plain eager execution: not tracing (``torch.compiler.is_compiling()``), ``t`` a plain
    ``torch.Tensor`` (not a fake or other subclass) and no ``TorchDispatchMode`` active."""
    if torch.compiler.is_compiling() or type(t) is not torch.Tensor:
        return False
    return _dispatch_depth is not None and _dispatch_depth() == 0  # unknown torch: the op, always


@torch.library.custom_op("moekit::rounded", mutates_args=())
def _rounded_op(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)`` as an op torch.compile cannot look into (:func:`rounded`)."""
    return x.to(dtype, copy=True)


@_rounded_op.register_fake
def _rounded_fake(x, dtype):
    return torch.empty_like(x, dtype=dtype)


def _rounded_setup(ctx, inputs, output):
    ctx.in_dtype = inputs[0].dtype


def _rounded_backward(ctx, grad):
    return grad.to(ctx.in_dtype), None  # a cast's gradient (round 62: none was registered, so compiled training of a
    # bf16 layer through a rounding, e.g. the zero-expert combine's twin, failed to compile)


_rounded_op.register_autograd(_rounded_backward, setup_context=_rounded_setup)


def expand_tiles(scale: torch.Tensor, rows: int, cols: int, n: int, k: int) -> torch.Tensor:
    """``out[..., i, j] = scale[..., i // rows, j // cols]``: ``[..., ⌈n/rows⌉, ⌈k/cols⌉] -> [..., n, k]``."""
    return scale.repeat_interleave(rows, dim=-2)[..., :n, :].repeat_interleave(cols, dim=-1)[..., :k]


@torch.library.custom_op("moekit::tiles_expanded", mutates_args=())
def tiles_expanded(scale: torch.Tensor, rows: int, cols: int, n: int, k: int) -> torch.Tensor:
    """:func:`expand_tiles` as an op torch.compile cannot look into (``ops._quant_rules._expand``: inductor
    miscompiled the partial blocks of every form tried)."""
    return expand_tiles(scale, rows, cols, n, k).clone()


@tiles_expanded.register_fake
def _tiles_expanded_fake(scale, rows, cols, n, k):
    return scale.new_empty((*scale.shape[:-2], n, k))


def rounded(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)``, a rounding that ``torch.compile`` keeps: inductor drops a float32 -> bf16 / fp16 -> float32
    round trip inside a fused kernel (unless ``emulate_precision_casts``), which SPEC §8's quantised math needs
    (round 56: a compiled fp8 layer's activations skipped the rounding to params_dtype before w2's quantisation, 5.8e-3
    to 1.3e-2 relative RMS from eager, past the 5e-3 bound); while compiling it goes through an opaque op."""
    if x.dtype == dtype:
        return x
    return _rounded_op(x, dtype) if torch.compiler.is_compiling() else x.to(dtype)


def unit_rows(*tensors):
    """Each tensor (or None) with a unit last-dimension stride (``contiguous()``; the same tensor when it already is):
    the kernels index rows as ``base + row · stride(0) + col``. The custom ops' bodies call it, so a direct
    ``torch.ops.moekit.*`` call with a transposed view is right, not read with the wrong strides (round 54)."""
    return tuple(t if t is None or t.is_contiguous() else t.contiguous() for t in tensors)


def autocast_off(fn):
    """``fn(x, ...)`` run with autocast off on ``x``'s device where it is on: the torch twins' GEMMs run in the
    layer's dtype, as the kernels do (round 68: under ``torch.autocast`` their ``@`` ran in bf16 — a float32 or fp8
    layer moved 5e-3 to 1.4e-2 from itself and from the Triton path, float16's float32 pre-activations overflowed)."""
    @functools.wraps(fn)  # (its module and name too: pickles of layers name the table's functions)
    def run(*args, **kwargs):
        x = args[0] if args else next(iter(kwargs.values()), None)  # (the first argument: a tensor)
        device = x.device.type if isinstance(x, torch.Tensor) else "cpu"
        if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)
    return run
