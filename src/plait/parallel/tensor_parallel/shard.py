"""How a full tensor maps onto its tensor-parallel shards, and back.

A :class:`ShardSpec` says which dimension of a parameter is split over the tp ranks. A fused
parameter (the GPT's qkv weight stacks q, k and v) is split block by block, so each rank holds
its share of every block: [q_r; k_r; v_r]. A padded dimension (the vocabulary) is rounded up to a
multiple of tp with zero rows; the padding lives only in the shards, never in checkpoints.

Parameters of a parallel layer carry their spec as an attribute, so clipping and checkpointing
find them without knowing the layer types.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from plait.errors import PlanError

SHARD_ATTR = "plait_tp_shard"
PARTIAL_GRAD_ATTR = "plait_tp_partial_grad"


@dataclass(frozen=True)
class ShardSpec:
    """`dim` of size `size` (unpadded) is split over tp, in `fused` equal blocks, padded if `pad`."""

    dim: int
    size: int
    fused: int = 1
    pad: bool = False

    @property
    def block(self) -> int:
        return self.size // self.fused

    def per_rank_block(self, tp: int) -> int:
        """Rows of one fused block that each rank holds."""
        if self.block % tp and not self.pad:
            raise PlanError(f"size {self.block} does not split evenly over tp={tp}")
        return -(-self.block // tp)

    def local_size(self, tp: int) -> int:
        """Size of `dim` in one rank's shard."""
        return self.fused * self.per_rank_block(tp)

    def shard(self, full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
        """This rank's shard of `full` (a new tensor; padding rows are zero)."""
        if full.size(self.dim) != self.size:
            raise PlanError(f"tensor of shape {tuple(full.shape)} has size {full.size(self.dim)} "
                            f"in dim {self.dim}; the shard spec expects {self.size}")
        per = self.per_rank_block(tp)
        blocks = full.unflatten(self.dim, (self.fused, self.block))
        if per * tp > self.block:
            shape = list(blocks.shape)
            shape[self.dim + 1] = per * tp - self.block
            blocks = torch.cat([blocks, blocks.new_zeros(shape)], dim=self.dim + 1)
        return blocks.narrow(self.dim + 1, rank * per, per).flatten(self.dim, self.dim + 1).clone()

    def unshard(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every rank's shard, in rank order (padding dropped)."""
        tp = len(shards)
        per = self.per_rank_block(tp)
        blocks = torch.cat([s.unflatten(self.dim, (self.fused, per)) for s in shards], dim=self.dim + 1)
        return blocks.narrow(self.dim + 1, 0, self.block).flatten(self.dim, self.dim + 1).contiguous()


def set_shard_spec(p: nn.Parameter, spec: ShardSpec) -> None:
    setattr(p, SHARD_ATTR, spec)


def shard_spec(p: torch.Tensor) -> ShardSpec | None:
    """The spec of a tensor-parallel shard, or None for a parameter every tp rank holds whole."""
    return getattr(p, SHARD_ATTR, None)


def mark_partial_grad(p: nn.Parameter) -> None:
    """A replicated parameter whose gradient each tp rank computes from part of the sequence."""
    setattr(p, PARTIAL_GRAD_ATTR, True)


def has_partial_grad(p: torch.Tensor) -> bool:
    return getattr(p, PARTIAL_GRAD_ATTR, False)


def sum_partial_grads(params, group) -> None:
    """All-reduce (sum) over `group` the gradients that each tp rank holds only part of.

    Parameters replicated over tp but used on sequence shards (sequence parallelism) get a partial
    gradient on every rank; one flat all-reduce makes them whole.
    """
    grads = [p.grad for p in params if has_partial_grad(p) and p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


class ShardedParams:
    """Makes each rank's shard parameter of a plain parameter, once: tied weights stay tied.

    Two layers that share a plain parameter (the GPT's embedding and head) get the same shard
    parameter, provided they split it the same way.
    """

    def __init__(self, rank: int, tp: int):
        self.rank, self.tp = rank, tp
        self._made: dict[int, tuple[nn.Parameter, ShardSpec]] = {}

    def take(self, plain: nn.Parameter, spec: ShardSpec, where: str) -> nn.Parameter:
        if id(plain) in self._made:
            param, made_spec = self._made[id(plain)]
            if made_spec != spec:
                raise PlanError(f"{where} shares its parameter with another layer that splits it "
                                f"differently ({made_spec} vs {spec}); tied parameters need one style")
            return param
        with torch.no_grad():
            data = spec.shard(plain.detach(), self.rank, self.tp)
        param = nn.Parameter(data, requires_grad=plain.requires_grad)
        set_shard_spec(param, spec)
        self._made[id(plain)] = (param, spec)
        return param
