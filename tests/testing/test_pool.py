"""The worker pool reports a failing or hung rank with its traceback instead of hanging."""

from __future__ import annotations

import time

import pytest

from plait.testing import WorkerPool, WorkerError


def _rank():
    import torch.distributed as dist
    return dist.get_rank()


def _fail_on_rank_one():
    import torch.distributed as dist
    if dist.get_rank() == 1:
        raise ValueError("rank one is unhappy")
    return "ok"


def _hang_on_rank_zero():
    import torch.distributed as dist
    if dist.get_rank() == 0:
        time.sleep(60)
    return "ok"


def _make_groups():
    import torch.distributed as dist
    from plait.testing.pool import _live_groups
    dist.new_group([0, 1])
    dist.new_group([0])  # collective: every rank calls it, only rank 0 holds it
    return len(_live_groups())


def _count_groups():
    from plait.testing.pool import _live_groups
    return len(_live_groups())


def test_groups_a_task_makes_are_released_when_it_returns():
    with WorkerPool(2, timeout_s=60) as pool:
        assert pool.run(_make_groups) == [2, 1]
        assert pool.run(_count_groups) == [0, 0]


def test_failure_names_the_rank_and_pool_recovers():
    with WorkerPool(2, timeout_s=30) as pool:
        assert pool.run(_rank) == [0, 1]
        with pytest.raises(WorkerError, match=r"(?s)rank 1.*ValueError: rank one is unhappy"):
            pool.run(_fail_on_rank_one)
        assert pool.run(_rank) == [0, 1]  # restarted transparently


def test_hang_is_reported_not_waited_for():
    with WorkerPool(2, timeout_s=60) as pool:
        assert pool.run(_rank) == [0, 1]  # workers have imported this module: answers are quick
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match=r"ranks \[0\] did not answer"):
            pool.run(_hang_on_rank_zero, timeout_s=5)
        assert time.monotonic() - t0 < 30


def test_unpicklable_task_is_refused_at_once():
    with WorkerPool(2, timeout_s=60) as pool:
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match="module-level function"):
            pool.run(lambda: 1)
        assert time.monotonic() - t0 < 5
        assert pool.run(_rank) == [0, 1]


def test_restarts_reuse_no_port_and_keep_working():
    # Each restart hosts a fresh store in the parent; several in a row must all come up.
    with WorkerPool(2, timeout_s=30) as pool:
        for _ in range(3):
            with pytest.raises(WorkerError):
                pool.run(_fail_on_rank_one)
            assert pool.run(_rank) == [0, 1]


def test_start_up_past_its_deadline_says_how_far_each_rank_got():
    with WorkerPool(2, startup_timeout_s=0.3) as pool:  # too short to import torch
        with pytest.raises(WorkerError, match=r"(?s)start-up failed.*rank 0 last reported: starting"):
            pool.run(_rank)
