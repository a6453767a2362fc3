"""Backend choice: "torch" (reference, any device) or "triton" (CUDA kernels).

``"auto"`` resolves once (at construction of a layer) to Triton on CUDA when Triton imports, else to
torch. An explicit backend that cannot run raises instead of falling back.
"""

from __future__ import annotations

import functools
import logging

import torch

BACKENDS = ("auto", "torch", "triton")
log = logging.getLogger("moekit")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _triton_can_run(device: torch.device) -> str | None:
    """None if Triton can run on ``device``, else the reason it cannot."""
    import os

    if not triton_available():
        return "triton is not installed (pip install 'moekit[triton]')"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None  # the Triton interpreter (tests on CPU)
    return f"triton kernels need a CUDA device (or TRITON_INTERPRET=1 on CPU), got {device}"


def resolve_backend(backend: str, device, *, quiet: bool = False) -> str:
    """Return "torch" or "triton" for ``device``; raise if an explicit backend cannot run there."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if backend == "torch":
        return "torch"
    reason = _triton_can_run(device)
    if backend == "triton":
        if reason is not None:
            raise RuntimeError(f"backend='triton' cannot run: {reason}")
        return "triton"
    chosen = "triton" if reason is None and device.type == "cuda" else "torch"
    if not quiet:
        log.info("moekit: backend='auto' chose %r on %s", chosen, device)
    return chosen
