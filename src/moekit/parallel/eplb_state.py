"""Per-layer EPLB state: the routing maps (logical ↔ physical) and the load window.

    replica(t, e) = (hash(t·W + ep_rank) ^ hash(step) + e) mod count[e]    (t: the token's index on this rank)
    physical(t, e) = logical_to_physical[e, replica(t, e)]
    load_window[s mod window, e] = live slots routed to logical expert e at step s (this rank)

The hash mixes the token index (never ``(t·K + k) mod replicas``, which ties the replica to the slot
position), so a hot expert's tokens spread evenly over its replicas (adding ``e`` shifts every token of
expert ``e`` alike: each expert's share per replica is what the hash alone gives). Adding the expert id
decorrelates one token's experts: replicas are listed in ascending physical id, so with the hash alone a
token whose experts all have ``c`` replicas took replica ``h mod c`` of every one, the same end of the EP
group, and a decode step of a few tokens loaded one rank. Measured on random routings (K distinct experts
of 8, every expert on every rank, mean over steps of max/mean slots per rank; ``test_eplb.py``): W = K = 4,
one token 4.0 -> 1.74, four tokens 3.0 -> 1.37; W = K = 2, one token 2.0 -> 1.40, four 1.5 -> 1.24.

Round 49 tried this and took it back: the EPLB gloo test lost bit-exactness against the single-process
layer on every token whose slots the change split across ranks ("cause not found"). Round 50 found the
cause in the test, not here: at W = 2 <= K = 2 its ``"auto"`` forwards take the all-gather path, which
is allclose only (each rank's partial sum is rounded to bf16 before the reduce-scatter adds them;
:mod:`moekit.parallel.dispatch`) and bit-exact only on a token whose slots all sit on one rank (the other
partials are +0). The hash alone kept all 12 of the test's tokens (rank 0, routed to the hot experts 2
and 3, each with a replica on both ranks) on one rank: both experts took the same replica index. With
``+ e`` all 12 were split; 114 of their 384 outputs moved, 104 by one bf16 step, the rest by 2-10 steps
(small values after cancellation), max 7.8e-3 against max|ref| 2.1 (relative RMS 2.7e-3: SPEC §4's
tolerance holds). The all-to-all path (one row per ``(token, k)``, weighted in fp32 and summed in the
single-GPU order) stayed bit-exact with every token split, at W = 2 and 4; ``dist_checks_eplb`` now asserts
each path's own equality, on tokens it checks are split.

All tensors have fixed shapes and are updated in place (CUDA graphs that captured them stay valid); the
step counter is a device tensor advanced once per forward on every rank, so every rank's window covers the
same steps. The maps are derived from the placement (kept on the host too): a state moved off the meta device
(``to_empty``) derives them again and starts an empty window (round 53: they held uninitialised memory, and routing
raised or sent slots to the wrong replicas).
"""

from __future__ import annotations

import contextlib
import functools

import torch

from .eplb import logical_to_physical
from ..experts.placement import ExpertPlacement, check_counts, check_physical_to_logical
from ..experts.placement_state import PLACEMENT_KEY, initial_p2l, placement_error, saved_p2l, state_buffers

DEFAULT_WINDOW = 128


def replica_hash(index: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix of ``index`` (int64 ``>= 0``, ``< 2**31``) -> int64 in ``[0, 2**32)``."""
    if not isinstance(index, torch.Tensor):  # (round 62: a list times an int repeated the list: MemoryError)
        raise TypeError(f"index must be a torch.Tensor, got {type(index).__name__}")
    h = (index * 2654435761) & 0xFFFFFFFF
    h = h ^ (h >> 15)
    h = (h * 0x2C1B3C6D) & 0xFFFFFFFF
    return h ^ (h >> 12)


class EplbState(torch.nn.Module):
    """Buffers: ``physical_to_logical [P]``, ``logical_to_physical [E, max_replicas]`` (-1 padded),
    ``replica_count [E]``, ``load_window [window, E]``, ``step []`` (all int64, not in state_dict)."""

    def __init__(self, placement: ExpertPlacement, window_size: int = DEFAULT_WINDOW, num_groups: int = 1, device=None):
        super().__init__()
        if not isinstance(placement, ExpertPlacement):
            raise TypeError(f"placement must be a moekit ExpertPlacement, got {type(placement).__name__}")
        check_counts(window_size=window_size, num_groups=num_groups)  # (round 62: a string was stored; numpy ints
        window_size, num_groups = int(window_size), int(num_groups)  # are ints: review)
        if window_size < 1 or num_groups < 1:
            raise ValueError(f"window_size and num_groups must be >= 1, got {window_size}, {num_groups}")
        e, p, w = placement.num_logical, placement.num_physical, placement.ep_size
        self.num_logical = e
        self.num_physical = p
        self.ep_size = w
        self.ep_rank = placement.ep_rank
        self.strategy = placement.strategy
        self.num_groups = num_groups
        self.window_size = window_size
        self.max_replicas = min(w, p - e + 1)
        kw = dict(dtype=torch.int64, device=device)
        with torch.inference_mode(False):  # normal tensors, updatable in place in any mode (round 68: a state built
            # under inference mode held inference tensors, and a compiled forward outside it failed on the record)
            for name, shape in (("physical_to_logical", (p,)), ("logical_to_physical", (e, self.max_replicas)),
                                ("replica_count", (e,)), ("load_window", (window_size, e)), ("step", ())):
                self.register_buffer(name, torch.zeros(shape, **kw), persistent=False)
        self._p2l: tuple[int, ...] = ()  # the maps' source, on the host (rebuilt from it after ``to_empty``)
        self.set_placement(placement)

    def _apply(self, fn, *args, **kwargs):
        # ``to_empty`` leaves uninitialised memory: from meta, or (round 63) of a state with values, found by comparing
        # the buffers (a few MB of int64 at most) with copies taken before
        before = None if self.step.is_meta else [b.clone() for b in self.buffers()]
        out = super()._apply(fn, *args, **kwargs)
        if not self.step.is_meta and (before is None or not all(
                torch.equal(a.to(b.device), b) for a, b in zip(before, self.buffers()))):
            self._derived()
        return out

    @torch.no_grad()
    def _derived(self) -> None:
        """The maps from the placement's host copy, an empty window, step 0 (after leaving the meta device)."""
        self.set_physical_to_logical(self._p2l)
        self.reset_window()
        with self.writable():
            self.step.zero_()

    def set_placement(self, placement: ExpertPlacement) -> None:
        """Derive the routing maps from ``placement`` (the experts' own, after a rebalance)."""
        sizes = (placement.num_logical, placement.num_physical, placement.ep_size)
        if sizes != (self.num_logical, self.num_physical, self.ep_size):
            raise ValueError(
                f"placement has E={placement.num_logical}, P={placement.num_physical}, ep_size={placement.ep_size}; "
                f"this state was built for E={self.num_logical}, P={self.num_physical}, ep_size={self.ep_size}"
            )
        self.set_physical_to_logical(placement.physical_to_logical)

    def checked(self, physical_to_logical) -> tuple[list[int], list, list]:
        """``(p2l, logical -> physical table, replica counts)`` of a placement, or ``ValueError`` (nothing changed)."""
        p2l = list(check_physical_to_logical(physical_to_logical, self.num_logical, self.num_physical, self.ep_size,
                                             self.strategy))
        return (p2l, *logical_to_physical(p2l, self.num_logical, self.max_replicas))

    @torch.no_grad()
    def set_physical_to_logical(self, physical_to_logical) -> None:
        """The three routing maps, overwritten in place (CUDA graphs that captured them stay valid)."""
        p2l, table, counts = self.checked(physical_to_logical)
        self._p2l = tuple(p2l)
        dev = self.physical_to_logical.device
        with self.writable():
            self.physical_to_logical.copy_(torch.tensor(p2l, dtype=torch.int64, device=dev))
            self.logical_to_physical.copy_(torch.tensor(table, dtype=torch.int64, device=dev))
            self.replica_count.copy_(torch.tensor(counts, dtype=torch.int64, device=dev))

    def map_logical_to_physical(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """topk_ids: [T, K] logical ids -> [T, K] physical ids (same dtype), by ``replica(t, e)`` (module docstring)."""
        ids = topk_ids.long()
        live = ids >= 0  # dead ids (-1: custom routing's out-of-range ones) stay dead (round 61: -1 indexed E - 1's)
        ids = ids.clamp(min=0)
        t = torch.arange(ids.shape[0], device=ids.device, dtype=torch.int64)
        # the step mixed in: a steady decode batch hashes the same few token indices every step, and a hot expert's
        # replicas kept their imbalance for good (round 64: W = 8, one token per rank, 3 of 8 replicas never used)
        h = (replica_hash(t * self.ep_size + self.ep_rank) ^ replica_hash(self.step % 2**31)).unsqueeze(1)
        replica = (h + ids) % self.replica_count[ids]
        return torch.where(live, self.logical_to_physical[ids, replica], -1).to(topk_ids.dtype)

    @torch.no_grad()
    def record(self, topk_ids: torch.Tensor, topk_weights: torch.Tensor, on_input: bool) -> None:
        """Count this step's live slots per logical expert (topk_ids: physical ids [T, K]). A state built under
        ``torch.inference_mode()`` holds inference tensors, which only inference mode may update in place (round
        49: such a layer raised when called outside it, under ``no_grad``)."""
        with self.writable():
            self._record(topk_ids, topk_weights, on_input)

    def writable(self, *tensors: torch.Tensor):
        """A context in which the buffers (and ``tensors``: a rebalance's expert weights) may be updated in place:
        inference mode where one is an inference tensor (made under inference mode, which alone may update them:
        round 49, the forward's load record and ``rebalance()``'s moves raised outside it), else nothing."""
        if not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled() and any(
                t.is_inference() for t in (self.step, *tensors)):
            return torch.inference_mode()
        return contextlib.nullcontext()

    def _record(self, topk_ids: torch.Tensor, topk_weights: torch.Tensor, on_input: bool) -> None:
        ids = topk_ids.reshape(-1).long()
        held = ids >= 0  # dead slots (-1) add no load (round 64: counted on the last physical slot's expert)
        logical = self.physical_to_logical[ids.clamp(min=0)]
        live = (held if on_input else held & (topk_weights.reshape(-1) != 0)).long()
        counts = torch.zeros(self.num_logical, dtype=torch.int64, device=logical.device).index_add_(0, logical, live)
        self.load_window.index_copy_(0, (self.step % self.window_size).view(1), counts.unsqueeze(0))
        self.step += 1

    def window_load(self) -> torch.Tensor:
        """[E] int64: this rank's load summed over the window."""
        return self.load_window.sum(dim=0)

    @torch.no_grad()
    def materialize(self, device) -> None:
        """Buffers on the meta device (a layer built there whose weights a state dict assigned: these buffers are not
        in it) allocated on ``device`` and derived (:meth:`_derived`)."""
        with torch.inference_mode(False):
            for name, buf in list(self._buffers.items()):
                self._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype, device=device)
        self._derived()

    @torch.no_grad()
    def reset_window(self) -> None:
        with self.writable():
            self.load_window.zero_()

    def extra_repr(self) -> str:
        return (
            f"E={self.num_logical}, P={self.num_physical}, ep_size={self.ep_size}, "
            f"max_replicas={self.max_replicas}, window={self.window_size}"
        )


def watch_placement(experts, state) -> None:
    """Make ``experts`` (a :class:`~moekit.RoutedExperts`) tell ``state`` (its executor's :class:`EplbState`, or None
    without EPLB) the placement a state dict brings, however it reaches them (inside a layer or a model, or
    ``layer.routed_experts.load_state_dict``): checked before anything is copied (a pre hook: an EPLB state's own
    checks; without EPLB the layer routes logical id ``e`` to physical slot ``e`` and refuses a placement a rebalance
    moved, ``ValueError``), followed after it (a post hook). The hooks are partials of module functions (copies and
    pickles of the experts do not carry the executor and its process groups) and replace the ones an earlier executor
    registered. Round 53: a rebalanced state dict loaded through ``layer.routed_experts`` left the maps on the old
    placement, and an EP layer without EPLB took one silently (wrong outputs)."""
    for handle in getattr(experts, "_placement_hooks", ()):
        handle.remove()
    experts.placement_movable = state is not None  # (the state dicts it saves follow a rebalance: round 66)
    state_buffers(experts, state is not None)  # (round 67: the share and the placement as buffers)
    experts._placement_hooks = (
        experts._register_load_state_dict_pre_hook(functools.partial(_check_placement, state=state), with_module=True),
        experts.register_load_state_dict_post_hook(functools.partial(_follow_placement, state=state)))


def _check_placement(experts, state_dict, prefix, *args, state) -> None:
    p2l = saved_p2l(state_dict, prefix)
    if p2l is None:  # the initial placement or the current one (experts.placement_state.incoming_placement)
        return
    if state is not None:
        try:
            state.checked(p2l)
        except ValueError as err:
            raise placement_error(experts, prefix, err) from None
    elif p2l != initial_p2l(experts.placement):
        raise ValueError(
            f"layer {experts.layer_name!r}: the state dict places experts as an EPLB rebalance moved them "
            f"({prefix}{PLACEMENT_KEY} = {list(p2l)}), but the layer was built with enable_eplb=False, so its routing "
            "cannot reach the moved slots; build it with enable_eplb=True (and the saving layer's "
            "num_redundant_experts and expert_placement_strategy)")


def _follow_placement(experts, incompatible_keys, *, state) -> None:
    if state is None:
        return
    if state.step.is_meta and not experts.w13_weight.is_meta:  # weights assigned to a layer built on meta
        state.materialize(experts.w13_weight.device)
    if state._p2l != tuple(experts.placement.physical_to_logical):
        state.set_placement(experts.placement)
