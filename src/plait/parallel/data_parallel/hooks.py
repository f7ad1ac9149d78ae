"""Shared pieces of the reducer's communication hooks: byte accounting and deferred completion.

Every hook counts what it sends in a :class:`WireStats`: `payload` is the bytes this rank hands to
collectives; `wire` is the bytes it sends under the ring algorithms (all-reduce of B bytes over
n ranks: 2(n-1)/n·B; all-gather of B bytes per rank: (n-1)·B; reduce and broadcast: B), which
makes all-reduce and all-gather based schemes comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from plait.parallel.data_parallel.reducer import Bucket


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class WireStats:
    """Bytes sent by this rank since the last reset."""

    payload: int = 0
    wire: float = 0.0
    calls: int = 0

    def all_reduce(self, t: torch.Tensor, n: int) -> None:
        self._add(nbytes(t), 2 * (n - 1) / n * nbytes(t))

    def all_gather(self, t: torch.Tensor, n: int) -> None:
        self._add(nbytes(t), (n - 1) * nbytes(t))

    def point(self, t: torch.Tensor) -> None:
        """Reduce or broadcast: every byte leaves (or reaches) this rank once."""
        self._add(nbytes(t), float(nbytes(t)))

    def _add(self, payload: int, wire: float) -> None:
        self.payload += payload
        self.wire += wire
        self.calls += 1

    def reset(self) -> None:
        self.payload, self.wire, self.calls = 0, 0.0, 0


class Pending:
    """What a hook returns when work remains after the collective: `wait()` finishes it once."""

    def __init__(self, work: "dist.Work | None", finish: Callable[[], None]):
        self._work = work
        self._finish: Callable[[], None] | None = finish

    def wait(self) -> bool:
        if self._work is not None:
            self._work.wait()
            self._work = None
        if self._finish is not None:
            finish, self._finish = self._finish, None
            finish()
        return True


def group_size(group: "dist.ProcessGroup | None") -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def counted_all_reduce(bucket: Bucket, group, stats: WireStats) -> "dist.Work | None":
    """The uncompressed all-reduce of a whole bucket (the reducer's default), counted in `stats`."""
    stats.all_reduce(bucket.buffer, group_size(group))
    return dist.all_reduce(bucket.buffer, group=group, async_op=True)


class CountingAllReduce:
    """The uncompressed all-reduce (same as the reducer's default hook), with byte counting."""

    def __init__(self) -> None:
        self.stats = WireStats()

    def __call__(self, bucket: Bucket, group) -> "dist.Work | None":
        return counted_all_reduce(bucket, group, self.stats)
