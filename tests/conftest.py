"""Shared fixtures: persistent Gloo worker pools, one per world size, kept for the whole session."""

from __future__ import annotations

import pytest

from plait.testing import WorkerPool


class Pools:
    def __init__(self) -> None:
        self._pools: dict[int, WorkerPool] = {}

    def __call__(self, world_size: int) -> WorkerPool:
        if world_size not in self._pools:
            self._pools[world_size] = WorkerPool(world_size, timeout_s=180)
        return self._pools[world_size]

    def close(self) -> None:
        for p in self._pools.values():
            p.close()


@pytest.fixture(scope="session")
def pools():
    """`pools(n).run(fn, *args)` runs a module-level `fn` on n Gloo ranks and returns their results."""
    p = Pools()
    yield p
    p.close()
