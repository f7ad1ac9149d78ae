"""Rank 0's side of a model-parallel replica: the runner the engine calls, driving the others.

The engine sees an ordinary runner (:class:`~plait.serve.runner.StepRunner`): a KV cache whose
slots the scheduler hands out, and `forward(step) -> logits`. Behind it, `forward` broadcasts the
step (with the cache moves the scheduler made since the last one) to every rank, runs rank 0's
own share of the step, and returns the logits the last stage sent back. `start(step)` does the
same without waiting for the logits, for an engine with several steps in flight.
"""

from __future__ import annotations

import heapq
import logging

import torch
import torch.distributed as dist

from plait.errors import LaunchError
from plait.serve.kv_cache import KVCache
import plait.serve.model_parallel.message as message
from plait.serve.model_parallel.group import Layout, Workers
from plait.serve.model_parallel.schedule import Pending, Place, start_step
from plait.serve.model_parallel.shard import StageShard
from plait.serve.runner import StepInput

log = logging.getLogger(__name__)


class SharedSlots(KVCache):
    """Rank 0's share of the KV cache, which also remembers the slot moves to send to the others."""

    def __init__(self, local: KVCache):
        # Share the local tensors; slot bookkeeping (the free heap) lives here, on rank 0 only.
        self.__dict__.update(local.__dict__)
        self.moves: list[tuple[int, int, int]] = []
        self.window: range | None = None  # when set, slots are allocated from these only

    def allocate(self) -> int:
        if self.window is None:
            return super().allocate()
        slot = min((s for s in self._free if s in self.window), default=None)
        if slot is None:
            raise RuntimeError(f"no free KV-cache slot in {self.window}")
        self._free.remove(slot)
        heapq.heapify(self._free)
        return slot

    def move(self, src: int, dst: int, length: int) -> None:
        super().move(src, dst, length)
        self.moves.append((src, dst, length))


class ParallelRunner:
    """Runs each engine step on all tp × pp ranks; rank 0 is this process."""

    def __init__(self, shard: StageShard, place: Place, layout: Layout, workers: Workers):
        self.shard, self.place, self.layout, self.workers = shard, place, layout, workers
        self.cache = SharedSlots(shard.cache)
        self.quantum, self.span_quantum = layout.quantum, layout.span_quantum
        self.micro_batches = layout.micro_batches
        self._closed = False
        self._index = 0  # STEP messages sent: the step's tags (see schedule.tags)

    def _send(self, msg: message.Message, wait: bool = True):
        """Broadcast `msg`; without `wait`, return the work (its buffer must outlive it)."""
        buf = message.encode(msg, self.layout.message_size)
        if self.shard.device.type == "cuda":
            buf = buf.to(self.shard.device)
        try:
            work = dist.broadcast(buf, src=0, async_op=True)
            if wait:
                work.wait()
                return None
            return buf, work
        except RuntimeError as exc:
            raise LaunchError(f"a model-parallel rank is gone ({exc}); {self.workers.failure() or ''}") from exc

    @torch.no_grad()
    def forward(self, step: StepInput) -> torch.Tensor:
        return self.start(step).result()

    @torch.no_grad()
    def start(self, step: StepInput) -> Started:
        """Send `step` (with the cache moves made since the last one) to every rank and run rank
        0's share; the logits come from the returned handle's `result()`. Several steps may be
        started before their results are taken, and are taken in the order started."""
        if self._closed:
            raise LaunchError("the model-parallel engine is closed")
        moves, self.cache.moves = self.cache.moves, []
        limit = message.max_moves(self.layout.max_seqs)
        while len(moves) > limit:  # more moves than one message holds: send the oldest first
            self._send(message.Message(message.MOVES, moves=moves[:limit]))
            moves = moves[limit:]
        # Rank 0 starts on its share at once; the others need the message only when they start.
        sent = self._send(message.Message(message.STEP, step, moves, self.micro_batches), wait=False)
        index, self._index = self._index, self._index + 1
        try:
            pending = start_step(self.shard, self.place, step, self.micro_batches, index)
        except RuntimeError as exc:
            raise LaunchError(f"a model-parallel step failed ({exc}); {self.workers.failure() or ''}") from exc
        return Started(self, sent, pending)

    def close(self) -> None:
        """Stop the other ranks and leave the process group (idempotent)."""
        if self._closed:
            return
        self._closed = True
        buf = message.encode(message.Message(message.STOP), self.layout.message_size)
        if self.shard.device.type == "cuda":
            buf = buf.to(self.shard.device)
        self.workers.stop(buf)
        log.info("model-parallel replica (tp=%d, pp=%d) stopped", self.layout.tp, self.layout.pp)


class Started:
    """A step started on every rank; `result()` waits for its logits (rank 0 always gets them)."""

    def __init__(self, runner: ParallelRunner, sent, pending: Pending):
        self.runner, self.sent, self.pending = runner, sent, pending  # the broadcast buffer lives here

    def result(self) -> torch.Tensor:
        try:
            out = self.pending.finish()
            self.sent[1].wait()
        except RuntimeError as exc:
            raise LaunchError(f"a model-parallel step failed ({exc}); "
                              f"{self.runner.workers.failure() or ''}") from exc
        return out
