"""Autograd-aware collectives over a tensor-parallel group (Megatron-LM's f, g and their kin).

Each op is a pair: what forward does, and what backward must then do so that gradients are those
of the unsharded computation.

    copy_to_tp          identity             | all-reduce      (enter a column-parallel region)
    reduce_from_tp      all-reduce           | identity        (leave a row-parallel region)
    scatter_to_tp       keep own last-dim chunk | all-gather last dim
    gather_from_tp      all-gather last dim  | keep own chunk
    scatter_to_sp       keep own sequence chunk | all-gather sequence
    gather_from_sp      all-gather sequence  | reduce-scatter sequence  (sequence parallelism)
    reduce_scatter_to_sp reduce-scatter sequence | all-gather sequence

Activations are (batch, sequence, ...): the sequence is dim 1. The group is always passed in; a
group of one rank makes every op the identity without communicating.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from plait.errors import PlanError

SEQ_DIM = 1


def _size(group) -> int:
    return dist.get_world_size(group)


def _rank(group) -> int:
    return dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """Sum `x` over the group; reduces a contiguous `x` in place (gradients handed to backward)."""
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _check_split(x: torch.Tensor, dim: int, n: int) -> None:
    if x.size(dim) % n:
        what = "the sequence (dim 1)" if dim == SEQ_DIM else f"dim {dim}"
        raise PlanError(f"{what} of size {x.size(dim)} does not split evenly over tp={n}; "
                        "it must be a multiple of parallel.tp")


def _chunk(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = _size(group)
    _check_split(x, dim, n)
    return x.chunk(n, dim=dim)[_rank(group)].contiguous()


def all_gather_dim(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` (one all-gather into a contiguous buffer).

    A plain collective, not recorded by autograd; the ops below wrap it.
    """
    n = _size(group)
    x = x.contiguous()
    out = torch.empty((n * x.size(0),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_single(out, x, group=group)
    if dim == 0:
        return out
    # (n*d0, ...) -> (n, d0, ...) -> move the rank axis next to `dim` and merge it in.
    out = out.view((n,) + tuple(x.shape)).movedim(0, dim)
    shape = list(x.shape)
    shape[dim] *= n
    return out.reshape(shape)


def reduce_scatter_dim(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum over ranks, each keeping its own chunk of `dim` (a plain collective)."""
    n = _size(group)
    _check_split(x, dim, n)
    if dim != 0:
        # reduce_scatter splits dim 0: bring the chunks of `dim` to the front, contiguous.
        shape = list(x.shape)
        shape[dim] //= n
        shape.insert(dim, n)
        x = x.reshape(shape).movedim(dim, 0).contiguous().flatten(0, 1)
    x = x.contiguous()
    out = torch.empty((x.size(0) // n,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_single(out, x, group=group)
    return out


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        # Out of place, though x is a partial matmul result: selective recomputation keeps matmul
        # outputs to hand back in backward, and c10d's in-place all-reduce does not bump the
        # version counter that would flag the cached tensor as mutated. The copy costs one
        # activation-sized memcpy; x itself is freed on return, as no autograd node holds it.
        return _all_reduce(x.clone(memory_format=torch.contiguous_format), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _chunk(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_dim(grad, grad.dim() - 1, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_dim(x, x.dim() - 1, group)

    @staticmethod
    def backward(ctx, grad):
        return _chunk(grad, -1, ctx.group), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _chunk(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_dim(grad, SEQ_DIM, ctx.group), None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_dim(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_dim(grad, SEQ_DIM, ctx.group), None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_dim(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_dim(grad, SEQ_DIM, ctx.group), None


def _skip(group) -> bool:
    return _size(group) == 1


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient over `group` backward."""
    return x if _skip(group) else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce (sum) over `group` forward; identity backward."""
    return x if _skip(group) else _ReduceFromTP.apply(x, group)


def scatter_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's chunk of the last dim forward; all-gather it backward."""
    return x if _skip(group) else _ScatterToTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather along the last dim forward; keep this rank's chunk backward."""
    return x if _skip(group) else _GatherFromTP.apply(x, group)


def scatter_to_sp(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's chunk of the sequence forward; all-gather the sequence backward."""
    return x if _skip(group) else _ScatterToSP.apply(x, group)


def gather_from_sp(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather the sequence forward; reduce-scatter it backward."""
    return x if _skip(group) else _GatherFromSP.apply(x, group)


def reduce_scatter_to_sp(x: torch.Tensor, group) -> torch.Tensor:
    """Reduce-scatter along the sequence forward; all-gather the sequence backward."""
    return x if _skip(group) else _ReduceScatterToSP.apply(x, group)
