"""Gluon kernels (Triton's explicit-layout dialect): compiled GPUs only (sm_90+), no interpreter.

Each kernel here computes exactly the same bits as the Triton kernel of :mod:`moekit.ops._triton` it stands in
for (same instructions per output element, in the same order); what changes is the schedule. Gluon is
Triton's experimental front end: imported lazily by the launchers, so a Triton without it still runs the
Triton kernels.
"""
