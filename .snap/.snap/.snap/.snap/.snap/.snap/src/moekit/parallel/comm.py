"""Thin wrappers over ``torch.distributed``: group sizes, and the single-tensor collectives whose names
changed (torch 2.13 deprecates ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` in favour of
``all_gather_single`` / ``reduce_scatter_single``; torch 2.11 only has the old names)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def global_rank(group, rank_in_group: int) -> int:
    """Global rank of ``rank_in_group`` (point-to-point ops address peers by global rank)."""
    return dist.get_global_rank(group, rank_in_group)


def check_group(name: str, group) -> None:
    """A process group of the initialised default group (raise otherwise)."""
    if group is None:
        return
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{name} was given but torch.distributed is not initialised (call init_process_group)")
    if isinstance(group, int) and not isinstance(group, bool) and group == dist.GroupMember.NON_GROUP_MEMBER:
        # what dist.new_group returns to a process outside the group (an int), not a type error
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of {name} (new_group returned "
                         "GroupMember.NON_GROUP_MEMBER here): build the layer with the group this rank belongs to")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed ProcessGroup, got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of {name}")


def all_gather_into(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    """out: [W·N, ...] <- concatenation of every rank's inp [N, ...] (rank order)."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def reduce_scatter_into(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    """out [N, ...] on rank r = Σ_ranks inp[r·N:(r+1)·N] (inp: [W·N, ...])."""
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, inp, group=group)


def all_to_all_rows(out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> None:
    """Rows ``in_splits[r]`` of inp go to rank r; rows from rank r land in out's ``out_splits[r]`` block."""
    dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)


def all_reduce_sum(t: torch.Tensor, group) -> None:
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
