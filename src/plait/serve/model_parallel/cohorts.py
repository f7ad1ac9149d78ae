"""Pipelining across decode steps: the running sequences in cohorts, one step of each in flight.

Within one engine step a pipeline fills and drains: a sequence's next token needs the logits of
its last one, so stage 0 has nothing to do while the last stage finishes a step. Here the running
sequences are split into `cohorts` groups (one per pipeline stage, as vLLM's virtual engines do),
each with its own range of cache slots.
Each engine step starts the next step of every cohort that has none in flight, then waits for the
oldest one's logits and samples them: with two stages, stage 0 computes cohort A's step t + 1
while stage 1 computes cohort B's step t, so in steady state every stage is busy.

What a request sees does not change: each step's rows are computed with the same arithmetic
whatever else is in the step (see :mod:`plait.serve.runner`), every rank applies cache moves and
runs steps in the order rank 0 sent them, and a sequence is in at most one step in flight. A
request aborted while its step is in flight is dropped from that step's results.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from plait.errors import ConfigError
from plait.serve.engine import Engine, RequestOutput
from plait.serve.model_parallel.runner import ParallelRunner, Started
from plait.serve.scheduler import Plan, Scheduler
from plait.serve.sequence import Sequence, Status

log = logging.getLogger(__name__)


class CohortScheduler(Scheduler):
    """Keeps each cohort's sequences packed at the bottom of its own range of cache slots, so a
    cohort's decoding rows attend over one dense run of slots (interleaved cohorts would make every
    step attend over both cohorts' slots)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.windows: list[range] = [range(self.cache.max_seqs)]  # each cohort's slots

    def _fillers(self, slot: int) -> list[Sequence]:
        window = next(w for w in self.windows if slot in w)
        return [s for s in self.running if s.slot in window]


@dataclass
class _InFlight:
    cohort: int
    plan: Plan
    started: Started


class CohortEngine(Engine):
    """An :class:`Engine` over a pipelined :class:`ParallelRunner` that keeps one step of each
    of `cohorts` groups of sequences in flight (1: one step at a time, as a plain engine)."""

    def __init__(self, *args, cohorts: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.runner, ParallelRunner):
            raise ConfigError("a cohort engine runs on a model-parallel runner (open_engine with pp ≥ 2)")
        c = self.config
        self.scheduler = CohortScheduler(self.cache, c.step_tokens, c.prefill_chunk)
        self._members: list[list[Sequence]] = []
        self._inflight: deque[_InFlight] = deque()
        self._next = 0  # the cohort whose turn it is to start a step
        self.cohorts = cohorts

    @property
    def cohorts(self) -> int:
        """Groups of sequences with a step in flight at once; settable while the engine is idle."""
        return len(self._members)

    @cohorts.setter
    def cohorts(self, n: int) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"cohorts={n!r} must be an integer ≥ 1")
        if self._inflight or self.scheduler.running:
            raise ConfigError("cohorts can change only while no request is running")
        self._members = [[] for _ in range(n)]
        self._next = 0
        m = self.config.max_seqs
        self.scheduler.windows = [range(c * m // n, (c + 1) * m // n) for c in range(n)]

    def has_unfinished(self) -> bool:
        # Steps in flight are drained even when every request in them was aborted.
        return super().has_unfinished() or bool(self._inflight)

    def step(self) -> list[RequestOutput]:
        """Start a step for each cohort with none in flight, then finish the oldest step in flight."""
        n = self.cohorts
        busy = {f.cohort for f in self._inflight}
        for c in [(self._next + k) % n for k in range(n)]:
            if c in busy:
                continue
            plan = self._plan(c)
            if not plan:
                continue
            started = self.runner.start(self._step_input(plan))
            self._mark_computed(plan)
            self._inflight.append(_InFlight(c, plan, started))
            busy.add(c)
            self._next = (c + 1) % n
        if not self._inflight:
            return []
        done = self._inflight.popleft()
        logits = done.started.result()
        ready = self._ready(done.plan)
        live = [i for i, s in enumerate(ready) if s.status is Status.RUNNING]
        if len(live) < len(ready):  # aborted while in flight
            ready = [ready[i] for i in live]
            logits = logits[live]
        return self._outputs(ready, logits)

    def _plan(self, c: int) -> Plan:
        """Cohort `c`'s next step; newcomers join the cohort while its range of slots has room."""
        members = self._members[c] = [s for s in self._members[c] if s.status is Status.RUNNING]
        window = self.scheduler.windows[c]
        before = len(self.scheduler.running)
        self.cache.window = window
        try:
            plan = self.scheduler.schedule(among=members, admit=len(window) - len(members))
        finally:
            self.cache.window = None
        members += self.scheduler.running[before:]  # admitted just now, in admission order
        return plan

    def close(self) -> None:
        """Finish the steps in flight (their results are dropped), then stop the other ranks."""
        try:
            while self._inflight:
                self._inflight.popleft().started.result()
        finally:
            super().close()
