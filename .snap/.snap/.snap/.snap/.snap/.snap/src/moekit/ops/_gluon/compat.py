"""Gluon builtins whose names changed between the Triton releases moekit supports (3.6 and newer), under one name.

Each alias is the release's builtin object itself (the new name first: 3.9 keeps some old names as stubs that only
raise), so a kernel compiles to what calling that release's builtin directly gives:

- ``cta_barrier``: a barrier over the CTA's threads (``gl.thread_barrier`` in Triton 3.6, ``gl.barrier`` from 3.9);
- ``tma_load``: a TMA copy of a descriptor's box into shared memory, arriving on an mbarrier
  (``tma.async_copy_global_to_shared`` in 3.6, ``tma.async_load`` from 3.9, where the old name only raises);
- ``cp_async_load``: a ``cp.async`` copy of pointed-to elements into shared memory (Ampere's
  ``async_copy.async_copy_global_to_shared`` in 3.6, ``async_copy.async_load`` from 3.9);
- ``smem_reinterpret(desc, dtype, shape, layout)``: a shared-memory descriptor's bytes seen as another type and
  shape (the method ``_reinterpret`` in 3.6, ``reinterpret`` from 3.9), called as a function.
"""

from __future__ import annotations

from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import tma

cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
cp_async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
smem_reinterpret = (getattr(gl.shared_memory_descriptor, "reinterpret", None)
                    or gl.shared_memory_descriptor._reinterpret)
