"""Small collective helpers shared by several strategies."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn


def broadcast_from_first(module: nn.Module, group: Any) -> None:
    """Make `module`'s parameters and buffers equal over `group`, from its first rank's copy."""
    src = dist.get_global_rank(group, 0) if group is not None else 0
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=src, group=group)


def all_gather_flat(out: torch.Tensor, shard: torch.Tensor, group, world: int,
                    async_op: bool = False) -> "dist.Work | None":
    """Gather every rank's `shard` into `out` (rank order); a plain copy when alone."""
    if world == 1:
        if out.data_ptr() != shard.data_ptr():
            out.copy_(shard)
        return None
    # Looked up per call (so communication counters see it); torch 2.13 renamed the flat
    # collectives, older versions only have the *_into_tensor names.
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, shard, group=group, async_op=async_op)


def reduce_scatter_flat(out: torch.Tensor, full: torch.Tensor, group, world: int,
                        async_op: bool = False) -> "dist.Work | None":
    """Sum `full` over the group and leave this rank's slice in `out`; a copy when alone."""
    if world == 1:
        out.copy_(full)
        return None
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, full, group=group, async_op=async_op)
