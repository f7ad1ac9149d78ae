"""Megatron-LM tensor-parallel layers, each built from the plain layer it replaces.

Each layer takes the plain module and keeps this rank's shard of its weights:

    ColumnParallelLinear    W split by output rows: y_r = x W_rᵀ + b_r, no communication forward
    RowParallelLinear       W split by input columns: y = Σ_r x_r W_rᵀ (all-reduce) + b
    VocabParallelEmbedding  the table split by vocabulary rows; each rank looks up its own ids
    VocabParallelHead       logits for this rank's vocabulary slice (tied to the embedding shard)
    VocabParallelCrossEntropy  the loss from vocabulary-sharded logits, never gathering them

Column then row needs one all-reduce forward (after the row layer) and one backward (before the
column layer). With sequence parallelism the activations between blocks are split along the
sequence instead of replicated: the column layer all-gathers the sequence first and the row layer
reduce-scatters it, so LayerNorm, dropout and the residual work on 1/tp of the tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from plait.errors import PlanError
from plait.parallel.tensor_parallel.ops import (
    all_gather_dim,
    copy_to_tp,
    gather_from_sp,
    reduce_from_tp,
    reduce_scatter_to_sp,
)
from plait.parallel.tensor_parallel.shard import ShardedParams, ShardSpec, mark_partial_grad


def _group_info(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


class ColumnParallelLinear(nn.Module):
    """nn.Linear split by output features; the output stays split (feed a RowParallelLinear).

    `fused` > 1 splits the output in that many equal blocks separately (q, k and v of a fused
    attention projection), so each rank's slice is whole heads of each.
    """

    def __init__(self, linear: nn.Linear, group, *, fused: int = 1, sequence_parallel: bool = False,
                 pad: bool = False, params: ShardedParams | None = None, name: str = "linear"):
        super().__init__()
        rank, tp = _group_info(group)
        self.group, self.tp, self.rank = group, tp, rank
        self.sequence_parallel = sequence_parallel
        self.in_features = linear.in_features
        self.out_features = linear.out_features  # of the whole layer
        params = params or ShardedParams(rank, tp)
        spec = ShardSpec(dim=0, size=linear.out_features, fused=fused, pad=pad)
        if linear.out_features % fused:
            raise PlanError(f"{name}: out_features={linear.out_features} is not divisible by fused={fused}")
        self.weight = params.take(linear.weight, spec, f"{name}.weight")
        self.bias = params.take(linear.bias, spec, f"{name}.bias") if linear.bias is not None else None

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            return gather_from_sp(x, self.group)
        return copy_to_tp(x, self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._input(x), self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, tp={self.tp}, "
                f"local_out={self.weight.size(0)}, sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """nn.Linear split by input features; takes the split output of a ColumnParallelLinear.

    The partial products are summed over tp (all-reduce, or reduce-scatter along the sequence
    with sequence parallelism); the bias is added once, after the sum.
    """

    def __init__(self, linear: nn.Linear, group, *, sequence_parallel: bool = False,
                 params: ShardedParams | None = None, name: str = "linear"):
        super().__init__()
        rank, tp = _group_info(group)
        self.group, self.tp, self.rank = group, tp, rank
        self.sequence_parallel = sequence_parallel
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        params = params or ShardedParams(rank, tp)
        self.weight = params.take(linear.weight, ShardSpec(dim=1, size=linear.in_features), f"{name}.weight")
        self.bias = linear.bias
        if self.bias is not None and sequence_parallel:
            mark_partial_grad(self.bias)  # added to 1/tp of the tokens on each rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        y = reduce_scatter_to_sp(y, self.group) if self.sequence_parallel else reduce_from_tp(y, self.group)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, tp={self.tp}, "
                f"local_in={self.weight.size(1)}, sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """nn.Embedding split by vocabulary rows (padded to a multiple of tp).

    Each rank looks up the ids in its slice and zeros the rest; the sum over tp (all-reduce, or
    reduce-scatter along the sequence) is the full lookup.
    """

    def __init__(self, embedding: nn.Embedding, group, *, sequence_parallel: bool = False,
                 params: ShardedParams | None = None, name: str = "embedding"):
        super().__init__()
        if embedding.padding_idx is not None or embedding.max_norm is not None or embedding.sparse:
            raise PlanError(f"{name}: vocab-parallel embedding supports no padding_idx, max_norm or "
                            "sparse gradients")
        rank, tp = _group_info(group)
        self.group, self.tp, self.rank = group, tp, rank
        self.sequence_parallel = sequence_parallel
        self.num_embeddings = embedding.num_embeddings
        self.embedding_dim = embedding.embedding_dim
        params = params or ShardedParams(rank, tp)
        spec = ShardSpec(dim=0, size=embedding.num_embeddings, pad=True)
        self.weight = params.take(embedding.weight, spec, f"{name}.weight")
        self.vocab_start = rank * self.weight.size(0)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        local = idx - self.vocab_start
        outside = (local < 0) | (local >= self.weight.size(0))
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sp(out, self.group)
        return reduce_from_tp(out, self.group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, tp={self.tp}, "
                f"rows=[{self.vocab_start}, {self.vocab_start + self.weight.size(0)})")


class VocabParallelHead(ColumnParallelLinear):
    """The output projection to this rank's vocabulary slice; pass it to VocabParallelCrossEntropy.

    Padding columns (vocabulary not divisible by tp) get the lowest finite logit, so they add
    nothing to the softmax and receive no gradient.
    """

    def __init__(self, linear: nn.Linear, group, *, sequence_parallel: bool = False,
                 params: ShardedParams | None = None, name: str = "head"):
        super().__init__(linear, group, sequence_parallel=sequence_parallel, pad=True,
                         params=params, name=name)
        self.vocab_start = self.rank * self.weight.size(0)
        self.n_pad = max(0, self.vocab_start + self.weight.size(0) - self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        if self.n_pad:
            pad = torch.zeros(logits.size(-1), dtype=torch.bool, device=logits.device)
            pad[-self.n_pad:] = True
            logits = logits.masked_fill(pad, torch.finfo(logits.dtype).min)
        return logits


class _VocabParallelCE(torch.autograd.Function):
    """Mean cross-entropy of vocab-sharded logits: one all-gather of 2 floats per token forward,
    no communication backward."""

    @staticmethod
    def forward(ctx, logits, target, group, ignore_index):
        rank, tp = _group_info(group)
        n_local = logits.size(-1)
        start = rank * n_local
        local_max = logits.max(dim=-1).values
        local_lse = local_max + torch.log(torch.exp(logits - local_max.unsqueeze(-1)).sum(dim=-1))
        mine = (target >= start) & (target < start + n_local)
        local_target = torch.where(mine, target - start, torch.zeros_like(target))
        picked = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1) * mine
        # Each rank's log-sum-exp and (at most one nonzero) target logit, gathered in one call.
        stats = all_gather_dim(torch.stack([local_lse, picked]).unsqueeze(0), 0, group)
        lse = torch.logsumexp(stats[:, 0], dim=0)
        target_logit = stats[:, 1].sum(dim=0)
        valid = target != ignore_index
        count = valid.sum().clamp(min=1).to(logits.dtype)
        loss = ((lse - target_logit) * valid).sum() / count
        ctx.save_for_backward(logits, lse, local_target, mine, valid, count)
        return loss

    @staticmethod
    def backward(ctx, grad):
        logits, lse, local_target, mine, valid, count = ctx.saved_tensors
        g = torch.exp(logits - lse.unsqueeze(-1))
        g.scatter_add_(-1, local_target.unsqueeze(-1), -mine.to(g.dtype).unsqueeze(-1))
        g.mul_((valid.to(g.dtype) * (grad / count)).unsqueeze(-1))
        return g, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy over tokens from logits split by vocabulary over `group`.

    `logits` is (N, V/tp) on each rank, ordered by tp rank; `target` (N,) holds global ids.
    Equal to `F.cross_entropy` of the concatenated logits, without concatenating them.
    """
    if dist.get_world_size(group) == 1:
        return F.cross_entropy(logits, target, ignore_index=ignore_index)
    return _VocabParallelCE.apply(logits, target, group, ignore_index)


class VocabParallelCrossEntropy(nn.Module):
    """Drop-in for nn.CrossEntropyLoss (mean reduction) on vocabulary-sharded logits."""

    def __init__(self, group, ignore_index: int = -100):
        super().__init__()
        self.group = group
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, target, self.group, self.ignore_index)


class PositionShardEmbedding(nn.Embedding):
    """A position table that returns only this rank's part of the sequence (sequence parallelism).

    The table stays whole on every rank; its gradient covers this rank's positions only, so it
    is summed over tp after backward (see tensor_parallel/split.py).
    """

    def __init__(self, embedding: nn.Embedding, group):
        super().__init__(embedding.num_embeddings, embedding.embedding_dim,
                         _weight=embedding.weight.detach(), _freeze=not embedding.weight.requires_grad)
        # Keep the very same Parameter object (an optimizer may already hold it).
        self.weight = embedding.weight
        self.group = group
        self.rank, self.tp = dist.get_rank(group), dist.get_world_size(group)
        mark_partial_grad(self.weight)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.size(-1) % self.tp:
            raise PlanError(f"sequence length {idx.size(-1)} is not divisible by tp={self.tp}; "
                            "with parallel.sequence_parallel the sequence must split evenly")
        return super().forward(idx.chunk(self.tp, dim=-1)[self.rank])


class ReplicatedDropout(nn.Module):
    """Dropout on an activation every tp rank holds whole: all ranks must drop the same units.

    The mask comes from `generator`, which the model seeds identically on the ranks of a tp
    group (and differently across data-parallel replicas).
    """

    def __init__(self, p: float, generator: torch.Generator):
        super().__init__()
        self.p = p
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty(x.shape, dtype=x.dtype, device=x.device).bernoulli_(1.0 - self.p, generator=self.generator)
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"
