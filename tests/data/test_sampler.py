"""ElasticSampler: deterministic, disjoint, complete, resumable and re-shardable."""

from __future__ import annotations

import pytest

from plait.data.sampler import ElasticSampler
from plait.errors import DataError


def draws(samplers, n):
    return [[s.next_indices() for s in samplers] for _ in range(n)]


def make(n, dp, batch, seed=0):
    return [ElasticSampler(n, dp, r, batch, seed=seed) for r in range(dp)]


def test_deterministic_per_seed_and_epoch():
    a = draws(make(100, 2, 5), 10)
    b = draws(make(100, 2, 5), 10)
    c = draws(make(100, 2, 5, seed=1), 10)
    assert a == b and a != c


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_disjoint_and_complete_per_epoch(dp):
    n, batch = 96, 3
    samplers = make(n, dp, batch)
    epoch = draws(samplers, n // (dp * batch))
    seen = [i for step in epoch for rank in step for i in rank]
    assert sorted(seen) == list(range(n))  # complete and no index twice
    for step in epoch:
        flat = [i for rank in step for i in rank]
        assert len(set(flat)) == len(flat)  # disjoint across ranks
    assert all(s.epoch == 0 for s in samplers)
    nxt = draws(samplers, 1)
    assert all(s.epoch == 1 for s in samplers)
    assert sorted(i for r in nxt[0] for i in r) != sorted(i for r in epoch[0] for i in r)


def test_tail_shorter_than_a_draw_starts_the_next_epoch():
    samplers = make(10, 2, 2)  # 2 full draws of 4, tail of 2
    draws(samplers, 2)
    draws(samplers, 1)
    assert samplers[0].epoch == 1 and samplers[0].consumed == 4


def test_resume_mid_epoch_continues_exactly():
    full = draws(make(64, 2, 4), 6)
    first = make(64, 2, 4)
    draws(first, 2)
    states = [s.state_dict() for s in first]
    resumed = make(64, 2, 4)
    for s, st in zip(resumed, states):
        s.load_state_dict(st)
    assert draws(resumed, 4) == full[2:]


@pytest.mark.parametrize("new_dp,new_batch", [(1, 8), (4, 2)])
def test_reshard_neither_repeats_nor_skips(new_dp, new_batch):
    n = 64
    old = make(n, 2, 4)
    before = [i for step in draws(old, 3) for rank in step for i in rank]
    state = old[0].state_dict()
    new = make(n, new_dp, new_batch)
    for s in new:
        s.load_state_dict(state)
    after = [i for step in draws(new, (n - len(before)) // (new_dp * new_batch)) for rank in step for i in rank]
    assert sorted(before + after) == list(range(n))
    # and the order is the same permutation a single process would read
    single = make(n, 1, 8)
    order = [i for step in draws(single, n // 8) for rank in step for i in rank]
    assert before + after == order


def test_bad_inputs():
    with pytest.raises(DataError, match="dp_rank"):
        ElasticSampler(10, 2, 2, 1)
    with pytest.raises(DataError, match="micro_batch_size"):
        ElasticSampler(10, 4, 0, 3)
    s = ElasticSampler(10, 1, 0, 2)
    with pytest.raises(DataError, match="same data"):
        s.load_state_dict({"epoch": 0, "consumed": 0, "seed": 0, "num_samples": 11})
