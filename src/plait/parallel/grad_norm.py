"""One global gradient-norm clip for every layout, driven by how each gradient is sharded.

A strategy lists its gradients as :class:`GradPiece` s, each naming the mesh dimensions over
which that tensor is one disjoint part of the whole model's gradient: "tp" for a tensor-parallel
shard, "dp" for a ZeRO shard, "pp" for a pipeline stage's own layers. Squares are summed per set
of dimensions and each sum is all-reduced over exactly those groups, so every element of the full
gradient is counted once however the layout splits it. Replicated gradients (dimensions not named)
are the same on every rank of that dimension and are counted once by not reducing over it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from plait.mesh import ParallelMesh


@dataclass(frozen=True)
class GradPiece:
    """A gradient tensor (clipped in place) and the mesh dimensions it is a disjoint part over.

    `counted` False: a second copy of a gradient counted elsewhere (a weight tied across pipeline
    stages); it is scaled with the rest but not added to the norm.
    """

    grad: torch.Tensor
    split_over: tuple[str, ...] = ()
    counted: bool = True


def clip_grad_norm_(pieces: list[GradPiece], max_norm: float, mesh: ParallelMesh) -> torch.Tensor:
    """The L2 norm of the whole model's gradient; scales every piece by min(1, max_norm / norm)
    when `max_norm` > 0, as torch.nn.utils.clip_grad_norm_ does. Collective over the groups named.

    Every rank must pass the same set of `split_over` keys in the same order (they depend on the
    layout only, never on data), so the all-reduces match across ranks.
    """
    keys = _layout_keys(mesh)
    by_key: list[list[torch.Tensor]] = [[] for _ in keys]
    for piece in (p for p in pieces if p.counted):
        key = tuple(d for d in _DIMS if d in piece.split_over and mesh.size(d) > 1)
        by_key[keys.index(key)].append(piece.grad)
    # One multi-tensor norm per split rather than a few kernels per gradient (a GPU step would
    # launch hundreds). Squares accumulate in float64, so the norm does not depend on the order a
    # layout lists its pieces in (ZeRO by flat unit, plain data parallelism by parameter).
    zero = torch.zeros((), dtype=torch.float64, device=mesh.device)
    sums = torch.stack([
        torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).double().square().sum() if grads else zero
        for grads in by_key])
    for dim in _DIMS:  # nested sums over each named dimension: a sum over their product
        rows = [i for i, key in enumerate(keys) if dim in key]
        if rows and mesh.size(dim) > 1:
            part = sums[rows]
            dist.all_reduce(part, group=mesh.group(dim))
            sums[rows] = part
    norm = sums.sum().sqrt().float()
    if max_norm > 0 and pieces:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        grads = [p.grad for p in pieces]
        torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return norm


_DIMS = ("dp", "pp", "tp")


def _layout_keys(mesh: ParallelMesh) -> list[tuple[str, ...]]:
    """Every split the layout can produce, in a fixed order, so all ranks reduce the same vector
    (one all-reduce per mesh dimension), even ranks that hold no piece of some split."""
    dims = [d for d in _DIMS if mesh.size(d) > 1]
    return [tuple(d for i, d in enumerate(dims) if mask >> i & 1) for mask in range(1 << len(dims))]
