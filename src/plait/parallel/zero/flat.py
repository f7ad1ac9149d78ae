"""Flat parameter storage for ZeRO: one padded buffer per parameter group, split evenly over dp.

A :class:`FlatUnit` copies its parameters into one flat buffer `full` (padded to a multiple of
the dp size) and makes every parameter a view of it, so a single collective gathers the whole
group and no copy-out is needed. Rank r owns the contiguous shard `full[r*S:(r+1)*S]`.

For ZeRO-3 the shard lives in its own tensor and `full`'s storage is released between uses
(resized to zero bytes, as FSDP does): the parameters and the views autograd saved keep their
shapes, and see the values again once the storage is re-gathered. Touching a parameter while its
unit is released is invalid memory access; the ZeRO hooks gather before every use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from plait.errors import PlanError
from plait.parallel.blocks import ParamGroup
from plait.parallel.collectives import all_gather_flat

@dataclass(frozen=True)
class Piece:
    """The part of one parameter that lies in this rank's shard of its unit."""

    unit: int
    slot: int  # index of the parameter in its unit
    param_lo: int  # element range within the flattened parameter
    param_hi: int
    shard_lo: int  # the same elements within the rank's shard
    shard_hi: int


@dataclass
class GradState:
    """Stage 2/3 gradient bookkeeping of one unit during and between backward passes."""

    full: torch.Tensor | None = None  # this rank's unreduced gradients, while backward runs
    shard: torch.Tensor | None = None  # the reduced (averaged) shard, kept until zero_grad
    ready: set[int] = field(default_factory=set)  # slots whose gradient arrived in this backward
    used_here: list[bool] = field(default_factory=list)  # this rank produced the gradient
    used: list[bool] = field(default_factory=list)  # some rank did (since the last zero_grad)
    work: "dist.Work | None" = None
    out: torch.Tensor | None = None  # reduce-scatter destination
    launched: bool = False


class FlatUnit:
    """The parameters of one group as views of one flat buffer, and this rank's shard of it."""

    def __init__(self, index: int, group: ParamGroup, rank: int, world: int, keep_full: bool):
        params = group.params
        first = params[0]
        for name, p in zip(group.names, params):
            if p.dtype != first.dtype or p.device != first.device:
                raise PlanError(f"ZeRO flattens a block's parameters into one buffer: {name!r} is "
                                f"{p.dtype} on {p.device}, but {group.names[0]!r} is "
                                f"{first.dtype} on {first.device}")
        self.index = index
        self.block = group.block
        self.module = group.module
        self.names = group.names
        self.params: list[nn.Parameter] = params
        self.shapes = [p.shape for p in params]
        self.numels = [p.numel() for p in params]
        self.offsets = [sum(self.numels[:i]) for i in range(len(params))]
        self.numel = sum(self.numels)
        self.world = world
        self.shard_numel = -(-self.numel // world)
        self.padded = self.shard_numel * world
        self.lo = rank * self.shard_numel
        self.keep_full = keep_full
        with torch.no_grad():
            self.full = torch.zeros(self.padded, dtype=first.dtype, device=first.device)
            for p, off, n in zip(params, self.offsets, self.numels):
                self.full[off:off + n].copy_(p.detach().reshape(-1))
                p.data = self.full[off:off + n].view(p.shape)
        view = self.full[self.lo:self.lo + self.shard_numel]
        self.shard = view if keep_full else view.clone()
        self.grads = GradState(used_here=[False] * len(params), used=[False] * len(params))
        self.gather_work: "dist.Work | None" = None
        if not keep_full:
            self.release()

    # --- layout ------------------------------------------------------------------------------

    def pieces(self) -> list[Piece]:
        """This rank's pieces, one per parameter that overlaps the shard, in parameter order."""
        out = []
        hi = self.lo + self.shard_numel
        for slot, (off, n) in enumerate(zip(self.offsets, self.numels)):
            a, b = max(off, self.lo), min(off + n, hi)
            if a < b:
                out.append(Piece(self.index, slot, a - off, b - off, a - self.lo, b - self.lo))
        return out

    def param_flat(self, slot: int, full: torch.Tensor) -> torch.Tensor:
        """Parameter `slot`'s elements of a flat tensor laid out like `full`, in its shape."""
        off = self.offsets[slot]
        return full[off:off + self.numels[slot]].view(self.shapes[slot])

    # --- parameters ----------------------------------------------------------------------------

    @property
    def gathered(self) -> bool:
        return self.full.untyped_storage().nbytes() > 0

    def release(self) -> None:
        """Free the gathered parameters (ZeRO-3); the shard stays."""
        if not self.keep_full and self.gathered:
            self.full.untyped_storage().resize_(0)

    def gather(self, group, async_op: bool = False) -> "dist.Work | None":
        """All-gather every rank's shard into `full` (re-allocating its storage if released)."""
        if not self.gathered:
            self.full.untyped_storage().resize_(self.padded * self.full.element_size())
        with torch.no_grad():
            return all_gather_flat(self.full, self.shard, group, self.world, async_op)
