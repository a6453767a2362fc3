"""What the launchers ask of the device: compute capability, the Triton interpreter, programmatic dependent launch."""

from __future__ import annotations

import functools
from types import MappingProxyType

import torch
from triton import knobs

# Compile options of every moekit kernel launch. FMA contraction stays on, as the kernels were measured and their bits
# checked with it: Triton 3.9 warns that its default turns off in 3.10 when a launch leaves the option unset. Being
# explicit, it also outranks a user's TRITON_DEFAULT_FP_FUSION=0 (TRITON_FORCE_DISABLE_FP_FUSION still wins in 3.9).
KERNEL_OPTIONS = MappingProxyType({"enable_fp_fusion": True})


def pdl_ok(device: torch.device) -> bool:
    """Programmatic dependent launch: Hopper (sm_90) or newer, never under the interpreter."""
    return device.type == "cuda" and not interpreting() and major(device) >= 9


def major(device: torch.device) -> int:
    """The compute capability's major number of a CUDA device."""
    return capability_major(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=16)
def capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def interpreting() -> bool:
    """Triton kernels run under the interpreter (``TRITON_INTERPRET=1``)."""
    return bool(knobs.runtime.interpret)
