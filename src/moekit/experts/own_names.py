"""Which of a MoE layer's own parameters / buffers (not a per-expert tensor) a checkpoint name writes, as
:func:`~moekit.experts.mapping.load_layer_weights` resolves it: the name itself or a dotted tail of it
(``gate.weight``, ``shared_experts.up_proj.weight``, ``router.e_score_correction_bias``), else one half of a fused
``gate_up_proj`` a module holds. The checkpoint loader asks the same before reading anything
(:func:`moekit.loading.duplicates.check_duplicate_own`: two keys of a block writing one tensor)."""

from __future__ import annotations


def own_name(name: str, own) -> str | None:
    """The parameter / buffer of ``own`` that ``name`` (or a dotted tail of it) names, else None."""
    parts = name.split(".")
    return next((".".join(parts[i:]) for i in range(len(parts)) if ".".join(parts[i:]) in own), None)


#: the halves of a fused gate_up_proj, in its row order
HALVES = ("gate_proj.", "up_proj.")


def fused_half(name: str, own) -> tuple[str | None, int | None]:
    """(the fused ``….gate_up_proj.{weight|bias}`` of ``own``, 0 | 1) for ``….gate_proj.…`` / ``….up_proj.…`` of a
    module that holds the two fused (MiniMax-M3-VL's shared MLP, stored apart in its Hub layout: round 63)."""
    for half, proj in enumerate(HALVES):
        head, sep, leaf = name.rpartition(proj)
        if sep and (not head or head.endswith(".")) and (fused := own_name(f"{head}gate_up_proj.{leaf}", own)):
            return fused, half
    return None, None


def own_target(name: str, own) -> tuple[str | None, int | None]:
    """(the name in ``own`` that checkpoint ``name`` writes, None: the whole of it, or 0 | 1: that half of a fused
    gate_up_proj's rows); (None, None) where it names none."""
    pname = own_name(name, own)
    return (pname, None) if pname is not None else fused_half(name, own)
