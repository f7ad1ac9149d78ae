"""ShardSpec: shards put back together give the full tensor, for fused and padded dimensions."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from plait.errors import PlanError
from plait.parallel.tensor_parallel.shard import ShardedParams, ShardSpec, shard_spec


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("spec,shape", [
    (ShardSpec(dim=0, size=24), (24, 5)),
    (ShardSpec(dim=1, size=24), (5, 24)),
    (ShardSpec(dim=0, size=24, fused=3), (24, 5)),
    (ShardSpec(dim=0, size=37, pad=True), (37, 5)),
    (ShardSpec(dim=0, size=37, pad=True), (37,)),
])
def test_shard_then_unshard_is_the_identity(tp, spec, shape):
    full = torch.randn(*shape)
    shards = [spec.shard(full, r, tp) for r in range(tp)]
    assert all(s.size(spec.dim) == spec.local_size(tp) for s in shards)
    assert torch.equal(spec.unshard(shards), full)


def test_fused_shards_hold_their_part_of_each_block():
    # rows: q = 0..3, k = 10..13, v = 20..23; rank 1 of 2 holds q 2..3, k 12..13, v 22..23.
    full = torch.tensor([0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23]).float()
    assert ShardSpec(dim=0, size=12, fused=3).shard(full, 1, 2).tolist() == [2, 3, 12, 13, 22, 23]


def test_padding_rows_are_zero_and_only_on_the_last_ranks():
    full = torch.ones(5, 2)
    shards = [ShardSpec(dim=0, size=5, pad=True).shard(full, r, 4) for r in range(4)]
    assert [s.sum().item() for s in shards] == [4.0, 4.0, 2.0, 0.0]


def test_uneven_split_without_padding_is_an_error():
    with pytest.raises(PlanError, match="size 10 does not split evenly over tp=4"):
        ShardSpec(dim=0, size=10).local_size(4)


def test_tied_parameters_get_one_shard_parameter():
    emb = nn.Embedding(10, 4)
    params = ShardedParams(rank=0, tp=2)
    spec = ShardSpec(dim=0, size=10, pad=True)
    a = params.take(emb.weight, spec, "tok_emb.weight")
    assert params.take(emb.weight, spec, "head.weight") is a
    assert shard_spec(a) == spec
    with pytest.raises(PlanError, match="head.weight shares its parameter"):
        params.take(emb.weight, ShardSpec(dim=1, size=4), "head.weight")
