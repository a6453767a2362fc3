"""Small argument checks that raise errors naming the argument, the value and what was expected."""

from __future__ import annotations

import math
from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
#: dtypes the Triton kernels take (float64 is for the torch reference path only)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def declared_graph_safe(obj) -> bool:
    """``obj`` declares ``_moekit_graph_safe = True``: it only enqueues device work and reads its tensors by
    address, so a layer may capture it in its internal CUDA graphs. A module: its own class must declare it
    (a subclass declares it again); a function: the attribute on it (a ``functools.partial``: on its function)."""
    if isinstance(obj, torch.nn.Module):
        return type(obj).__dict__.get("_moekit_graph_safe", False) is True
    return getattr(getattr(obj, "func", obj), "_moekit_graph_safe", False) is True


def check_int(name: str, value, *, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    """A real ``bool``: ``"no"``, ``0`` or ``None`` are not silently read as truth values."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r} ({type(value).__name__})")
    return value


def check_real(name: str, value, *, finite: bool = True, positive: bool = False, float32: bool = False) -> float:
    """An int or float (not a bool, str or None), finite unless ``finite=False``, > 0 with ``positive``; with
    ``float32``, a normal float32 magnitude too (a factor the kernels apply in float32: round 61, 1e39 became inf and
    1e-50 became 0 there, a NaN or erased output); returned as a float. Finiteness as comparisons, not
    ``math.isfinite``, which fails a trace of a symbolic float (round 63: ``torch.compile(dynamic=True)``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {value!r} ({type(value).__name__})")
    if finite and not (value == value and abs(value) != math.inf):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    f32 = torch.finfo(torch.float32) if float32 else None
    if f32 is not None and value != 0 and not f32.tiny <= abs(value) <= f32.max:
        raise ValueError(f"{name} must be representable in float32 (a magnitude in [{f32.tiny}, {f32.max}]), "
                         f"got {value!r}")
    return float(value)


def check_callable(name: str, value) -> None:
    """None or a callable (a ``torch.nn.Module`` or a function), checked at construction, not at forward."""
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a callable (e.g. a torch.nn.Module) or None, got {value!r} "
                        f"({type(value).__name__})")


def check_subclass(name: str, value, base: type) -> None:
    """None or a class deriving from ``base``."""
    if value is not None and not (isinstance(value, type) and issubclass(value, base)):
        raise TypeError(f"{name} must be a subclass of {base.__module__}.{base.__qualname__} or None, got {value!r}")


#: dtype names accepted wherever a float dtype is an argument (config.json and command-line spellings)
DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}
#: the short name of a kernel dtype (config keys, bench rows' ``quant``, command-line values)
DTYPE_SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def as_float_dtype(name: str, value, allowed=FLOAT_DTYPES) -> torch.dtype:
    """A ``torch.dtype`` in ``allowed``, or one of its names (:data:`DTYPE_NAMES`, also as ``"torch.bfloat16"``).

    Decision (issue #12): names are accepted, as config.json and the command line spell dtypes that way;
    anything else raises ``TypeError`` naming the argument and listing what is accepted.
    """
    dtype = value
    if isinstance(value, str):
        dtype = DTYPE_NAMES.get(value.lower().removeprefix("torch."))
    if not isinstance(dtype, torch.dtype) or dtype not in allowed:
        names = sorted(k for k, d in DTYPE_NAMES.items() if d in allowed)
        raise TypeError(
            f"{name} must be one of {[str(d) for d in allowed]} or a name among {names}, got {value!r}"
        )
    return dtype


def check_device(name: str, device) -> torch.device:
    """``device`` as a ``torch.device``; ``ValueError`` naming ``name`` for an unknown device string and
    for a CUDA (or other accelerator) device on a machine without one (instead of torch's "Torch not compiled with
    CUDA")."""
    try:
        dev = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{name}={device!r} is not a device (expected e.g. 'cpu', 'cuda', 'cuda:1'): {err}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}={device!r}: no CUDA device is available on this machine "
                             f"(torch {torch.__version__}); use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name}={device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type not in ("cpu", "meta"):  # (round 66: xpu / mps raised torch's "not compiled with" errors)
        backend = torch.backends.mps if dev.type == "mps" else getattr(torch, dev.type, None)
        available = getattr(backend, "is_available", None)
        if not callable(available) or not available():
            raise ValueError(f"{name}={device!r}: no {dev.type} device is available on this machine "
                             f"(torch {torch.__version__}); use device='cpu'")
    return dev


def check_choice(name: str, value, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_shape(name: str, t: torch.Tensor, expected: tuple) -> None:
    """``expected`` may hold None for a free dimension."""
    ok = t.dim() == len(expected) and all(e is None or s == e for s, e in zip(t.shape, expected))
    if not ok:
        shown = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name} must have shape {shown}, got {list(t.shape)}")


def check_float_dtype(name: str, t: torch.Tensor, allowed=FLOAT_DTYPES) -> None:
    if t.dtype not in allowed:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in allowed]}, got {t.dtype}")


#: the integer dtypes ids and maps may have: int32 / int64; the narrower ones are widened to int32 where a kernel
#: reads them (round 64: uint8 ids failed to compile in the Triton align kernel)
NARROW_INT_DTYPES = (torch.int16, torch.int8, torch.uint8)
INT_DTYPES = (torch.int32, torch.int64, *NARROW_INT_DTYPES)


def check_int_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must have an integer dtype (int32 or int64; int16, int8 and uint8 are widened), "
                        f"got {t.dtype}")


def check_same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must share a device")


def host_sync_allowed() -> bool:
    """False while ``torch.compile`` traces, the current CUDA stream is capturing a graph, or a ``FakeTensorMode`` is
    active (round 63: fake tensors report a real device, and a check reading their values failed): then a check
    that reads values on the host (a synchronisation, data-dependent control flow) cannot run."""
    if torch.compiler.is_compiling() or _fake_mode_active():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _fake_mode_active() -> bool:
    """Whether a ``FakeTensorMode`` is on the dispatch stack (torch's private query, where this build has it)."""
    try:
        return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None
    except AttributeError:  # pragma: no cover (an older torch without it: fake modes are not detected)
        return False


def values_checkable(t: torch.Tensor) -> bool:
    """Whether a value check (:func:`check_finite`, id ranges) can read ``t``: not on the meta device
    (no values) and not while compiling or capturing (see :func:`host_sync_allowed`)."""
    return t.device.type != "meta" and host_sync_allowed()


def check_finite(name: str, t: torch.Tensor, hint: str = "") -> None:
    """Raise ``ValueError`` if ``t`` holds NaN or +-inf (a host synchronisation: reference path only).

    Policy (issue #12): the check is skipped where values cannot be read on the host -- while
    ``torch.compile`` traces (so ``torch.compile(layer, fullgraph=True)`` works on CPU too), while a
    CUDA graph is captured, and for tensors on the meta device (which hold no values). Eager calls on
    real tensors are always checked. See :func:`values_checkable`.
    """
    if not values_checkable(t):
        return
    if t.is_floating_point() and t.dtype.itemsize == 1:  # float8: torch has no isfinite for it (round 62)
        t = t.float()
    if t.numel() and not bool(torch.isfinite(t).all()):
        bad = t[~torch.isfinite(t)].flatten()[:4].tolist()
        row = f", first in row {int((~torch.isfinite(t)).reshape(t.shape[0], -1).any(1).nonzero()[0])}" \
            if t.dim() > 1 else ""
        raise ValueError(f"{name} contains non-finite values (e.g. {bad}{row}); expected finite numbers{hint}")
    if t.dtype == torch.float64 and t.numel() and not bool(torch.isfinite(t.float()).all()):
        # the math runs in float32: a float64 value beyond its range would become +-inf there (NaN weights)
        bad = t[~torch.isfinite(t.float())].flatten()[:4].tolist()
        raise ValueError(f"{name} holds float64 values beyond float32's range (e.g. {bad}); the math runs in float32, "
                         f"expected |values| <= {torch.finfo(torch.float32).max:.4g}")
