"""Tensor-parallel layers equal the plain layers built from the same (unsharded) weights.

For each layer, at tp=2 and 4, with and without sequence parallelism: the forward output, the
input gradient and every weight shard's gradient match nn.Linear / nn.Embedding / F.cross_entropy
run in one process on the full tensors (fp32).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from plait.mesh import ParallelMesh
from plait.parallel.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelHead,
    vocab_parallel_cross_entropy,
)
from plait.parallel.tensor_parallel.shard import ShardSpec, shard_spec

B, T, C = 2, 8, 16
TOL = 1e-5


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _seq_chunk(t: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    return t.chunk(tp, dim=1)[rank]


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _column(sp: bool, fused: int) -> dict[str, float]:
    mesh = ParallelMesh.build(tp=dist.get_world_size())
    group, rank, tp = mesh.tp_group, mesh.tp_rank, mesh.tp_size
    torch.manual_seed(0)
    plain = nn.Linear(C, 24)
    x = _rand(B, T, C, seed=1).requires_grad_()
    upstream = _rand(B, T, 24, seed=2)
    y = plain(x)
    (y * upstream).sum().backward()

    layer = ColumnParallelLinear(plain, group, fused=fused, sequence_parallel=sp)
    out_spec = ShardSpec(dim=2, size=24, fused=fused)
    xl = (_seq_chunk(x, rank, tp) if sp else x).detach().clone().requires_grad_()
    yl = layer(xl)
    (yl * out_spec.shard(upstream, rank, tp)).sum().backward()
    x_ref = _seq_chunk(x.grad, rank, tp) if sp else x.grad
    return {"out": _diff(yl, out_spec.shard(y, rank, tp)), "x_grad": _diff(xl.grad, x_ref),
            "w_grad": _diff(layer.weight.grad, shard_spec(layer.weight).shard(plain.weight.grad, rank, tp)),
            "b_grad": _diff(layer.bias.grad, shard_spec(layer.bias).shard(plain.bias.grad, rank, tp))}


def _row(sp: bool) -> dict[str, float]:
    mesh = ParallelMesh.build(tp=dist.get_world_size())
    group, rank, tp = mesh.tp_group, mesh.tp_rank, mesh.tp_size
    torch.manual_seed(0)
    plain = nn.Linear(24, C)
    x = _rand(B, T, 24, seed=1).requires_grad_()
    upstream = _rand(B, T, C, seed=2)
    y = plain(x)
    (y * upstream).sum().backward()

    layer = RowParallelLinear(plain_copy(plain), group, sequence_parallel=sp)
    xl = x.detach().chunk(tp, dim=-1)[rank].clone().requires_grad_()
    yl = layer(xl)
    y_ref, up = (_seq_chunk(y, rank, tp), _seq_chunk(upstream, rank, tp)) if sp else (y, upstream)
    (yl * up).sum().backward()
    bias_grad = layer.bias.grad.clone()
    if sp:  # each rank saw 1/tp of the tokens: the model sums these over tp after backward
        dist.all_reduce(bias_grad, group=group)
    return {"out": _diff(yl, y_ref), "x_grad": _diff(xl.grad, x.grad.chunk(tp, dim=-1)[rank]),
            "w_grad": _diff(layer.weight.grad, shard_spec(layer.weight).shard(plain.weight.grad, rank, tp)),
            "b_grad": _diff(bias_grad, plain.bias.grad)}


def plain_copy(linear: nn.Linear) -> nn.Linear:
    """A separate nn.Linear with the same weights (the row layer keeps the plain bias object)."""
    twin = nn.Linear(linear.in_features, linear.out_features)
    twin.load_state_dict(linear.state_dict())
    return twin


def _embedding(sp: bool, vocab: int) -> dict[str, float]:
    mesh = ParallelMesh.build(tp=dist.get_world_size())
    group, rank, tp = mesh.tp_group, mesh.tp_rank, mesh.tp_size
    torch.manual_seed(0)
    plain = nn.Embedding(vocab, C)
    idx = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(3))
    upstream = _rand(B, T, C, seed=2)
    y = plain(idx)
    (y * upstream).sum().backward()

    layer = VocabParallelEmbedding(plain, group, sequence_parallel=sp)
    yl = layer(idx)
    y_ref, up = (_seq_chunk(y, rank, tp), _seq_chunk(upstream, rank, tp)) if sp else (y, upstream)
    (yl * up).sum().backward()
    return {"out": _diff(yl, y_ref),
            "w_grad": _diff(layer.weight.grad, shard_spec(layer.weight).shard(plain.weight.grad, rank, tp))}


def _head_and_loss(sp: bool, vocab: int) -> dict[str, float]:
    """Tied vocab-parallel head + cross-entropy vs nn.Linear + F.cross_entropy (some targets ignored)."""
    mesh = ParallelMesh.build(tp=dist.get_world_size())
    group, rank, tp = mesh.tp_group, mesh.tp_rank, mesh.tp_size
    torch.manual_seed(0)
    plain = nn.Linear(C, vocab, bias=False)
    x = _rand(B, T, C, seed=1).requires_grad_()
    target = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(4))
    target[0, :3] = -100
    target[1, -1] = vocab - 1  # the last real class sits next to the padding
    loss = F.cross_entropy(plain(x).view(-1, vocab), target.view(-1))
    loss.backward()

    head = VocabParallelHead(plain, group, sequence_parallel=sp)
    xl = (_seq_chunk(x, rank, tp) if sp else x).detach().clone().requires_grad_()
    logits = head(xl)
    assert logits.shape == (B, T, head.weight.size(0))  # never the full vocabulary
    lp = vocab_parallel_cross_entropy(logits.view(-1, logits.size(-1)), target.view(-1), group)
    lp.backward()
    x_ref = _seq_chunk(x.grad, rank, tp) if sp else x.grad
    return {"loss": abs(lp.item() - loss.item()), "x_grad": _diff(xl.grad, x_ref),
            "w_grad": _diff(head.weight.grad, shard_spec(head.weight).shard(plain.weight.grad, rank, tp))}


def _cross_entropy(vocab: int) -> dict[str, float]:
    """The loss alone, on leaf logits split by vocabulary (vocab divisible by tp)."""
    mesh = ParallelMesh.build(tp=dist.get_world_size())
    rank, tp = mesh.tp_rank, mesh.tp_size
    logits = (_rand(B * T, vocab, seed=5) * 4).requires_grad_()
    target = torch.randint(0, vocab, (B * T,), generator=torch.Generator().manual_seed(6))
    loss = F.cross_entropy(logits, target)
    loss.backward()
    local = logits.detach().chunk(tp, dim=-1)[rank].clone().requires_grad_()
    lp = vocab_parallel_cross_entropy(local, target, mesh.tp_group)
    lp.backward()
    return {"loss": abs(lp.item() - loss.item()),
            "logit_grad": _diff(local.grad, logits.grad.chunk(tp, dim=-1)[rank])}


def _check(results: list[dict[str, float]]) -> None:
    for rank, diffs in enumerate(results):
        for what, d in diffs.items():
            assert d < TOL, f"rank {rank}: {what} differs by {d}"


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "sp"])
@pytest.mark.parametrize("fused", [1, 3])
def test_column_parallel_linear_matches_nn_linear(pools, tp, sp, fused):
    _check(pools(tp).run(_column, sp, fused))


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "sp"])
def test_row_parallel_linear_matches_nn_linear(pools, tp, sp):
    _check(pools(tp).run(_row, sp))


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "sp"])
@pytest.mark.parametrize("vocab", [40, 37], ids=["even", "padded"])
def test_vocab_parallel_embedding_matches_nn_embedding(pools, tp, sp, vocab):
    results = pools(tp).run(_embedding, sp, vocab)
    _check(results)
    # A lookup plus zeros from the other ranks: no rounding at all.
    assert all(r["out"] == 0.0 for r in results)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "sp"])
@pytest.mark.parametrize("vocab", [40, 37], ids=["even", "padded"])
def test_vocab_parallel_head_and_loss_match_cross_entropy(pools, tp, sp, vocab):
    _check(pools(tp).run(_head_and_loss, sp, vocab))


@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_cross_entropy_matches_f_cross_entropy(pools, tp):
    _check(pools(tp).run(_cross_entropy, 40))
