"""Uneven hardware, the pieces: the speed-proportional split, sample weights, the sampler's uneven
draws (the same samples per step as the even split), stage speeds and the speed-aware cut."""

from __future__ import annotations

import pytest

from plait.data.sampler import ElasticSampler
from plait.errors import ConfigError, DataError, PlanError
from plait.mesh import MeshShape
from plait.parallel.pipeline.partition import balance
from plait.profile.balance import (dp_speeds, replica_speeds, sample_weights, split_counts,
                                   stage_speeds)


def test_split_is_proportional_complete_and_at_least_one_each():
    assert split_counts(32, [1.0, 1.0]) == [16, 16]
    assert split_counts(30, [1.0, 0.5]) == [20, 10]
    assert split_counts(8, [1.0, 0.5]) == [5, 3]
    assert split_counts(4, [100.0, 1.0, 1.0]) == [2, 1, 1]  # everyone keeps one sample
    for total, speeds in [(17, [0.3, 1.7, 1.0]), (64, [1, 2, 3, 4]), (9, [1e-6, 1.0])]:
        counts = split_counts(total, speeds)
        assert sum(counts) == total and min(counts) >= 1
    with pytest.raises(ConfigError, match="at least one"):
        split_counts(2, [1.0, 1.0, 1.0])
    with pytest.raises(ConfigError, match="speeds"):
        split_counts(8, [1.0, 0.0])


def test_sample_weights_turn_the_average_into_the_sample_mean():
    counts = [5, 3]
    w = sample_weights(counts)
    assert w == [1.25, 0.75]
    # Rank means g_r over n_r samples; the weighted average over 2 ranks is the mean over all 8.
    g = [2.0, 10.0]
    assert sum(wr * gr for wr, gr in zip(w, g)) / 2 == pytest.approx((5 * 2.0 + 3 * 10.0) / 8)
    assert sample_weights([4, 4]) == [1.0, 1.0]


def test_uneven_draws_take_the_same_samples_per_step_as_even_ones():
    even = [ElasticSampler(100, 2, r, batch_size=4, seed=3) for r in range(2)]
    uneven = [ElasticSampler(100, 2, r, batch_size=4, seed=3) for r in range(2)]
    for s in uneven:
        s.set_split([6, 2])
    assert uneven[0].local_batch == 6 and uneven[1].local_batch == 2
    for _ in range(30):  # across several epochs: the same draws, split differently
        a = [s.next_indices() for s in even]
        b = [s.next_indices() for s in uneven]
        assert len(b[0]) == 6 and len(b[1]) == 2
        assert a[0] + a[1] == b[0] + b[1]
    assert uneven[0].state_dict() == even[0].state_dict()
    with pytest.raises(DataError, match="sum to the draw size 8"):
        uneven[0].set_split([5, 5])
    with pytest.raises(DataError, match="≥ 1"):
        uneven[0].set_split([8, 0])


def test_speeds_per_replica_and_stage_follow_the_slowest_rank():
    shape = MeshShape(dp=2, pp=2, tp=1)  # ranks: (pp0: dp0 r0, dp1 r1), (pp1: dp0 r2, dp1 r3)
    rank_speeds = [1.0, 1.0, 0.5, 1.0]
    assert stage_speeds(rank_speeds, shape) == [1.0, 0.5]
    assert replica_speeds(rank_speeds, shape) == [0.5, 1.0]
    # measured: replica 0's busiest rank (r2) takes 2 s for 8 samples, replica 1's 1 s
    assert dp_speeds([1.0, 1.0, 2.0, 0.5], [8, 8, 8, 8], shape) == [4.0, 8.0]


def test_speed_aware_cut_gives_the_fast_stage_more_layers():
    costs = [1.0] * 6
    assert balance(costs, 2) == [(0, 3), (3, 6)]
    assert balance(costs, 2, [1.0, 0.5]) == [(0, 4), (4, 6)]
    assert balance(costs, 2, [0.5, 1.0]) == [(0, 2), (2, 6)]
    assert balance([1, 1, 1, 1, 1, 1, 1, 1, 1], 3, [1.0, 1.0, 1.0]) == [(0, 3), (3, 6), (6, 9)]
    with pytest.raises(PlanError, match="speed > 0"):
        balance(costs, 2, [1.0])
