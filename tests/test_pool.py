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
