"""Iteration-level scheduling: which sequences run in the next step, under a token budget.

Every step, all running sequences that are decoding advance by one token. The budget left over
(`max_step_tokens` minus the decoders) goes to prompt chunks: first those of sequences already
prefilling, then newcomers from the queue, first come first served, while a cache slot is free.
Running streams are never stalled by a long prompt, which is prefilled a chunk per step, and a
finished or cancelled sequence frees its slot for the queue at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from plait.errors import ConfigError
from plait.serve.kv_cache import KVCache
from plait.serve.sequence import Sequence, Status


@dataclass
class Plan:
    decode: list[Sequence] = field(default_factory=list)
    prefill: list[tuple[Sequence, int, int]] = field(default_factory=list)  # (seq, start, end)

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill)


class Scheduler:
    def __init__(self, cache: KVCache, max_step_tokens: int, prefill_chunk: int):
        if prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk={prefill_chunk} must be ≥ 1")
        # With every other slot decoding, one prompt chunk must still fit, or prefill could starve.
        need = cache.max_seqs - 1 + prefill_chunk
        if max_step_tokens < need:
            raise ConfigError(f"max_step_tokens={max_step_tokens} must be ≥ max_seqs - 1 + prefill_chunk "
                              f"= {need}, so a prompt chunk fits beside every decoding sequence")
        self.cache = cache
        self.max_step_tokens = max_step_tokens
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _chunk_end(self, seq: Sequence) -> int:
        # Chunks start at multiples of prefill_chunk: their shapes depend on the request alone.
        return min(seq.computed + self.prefill_chunk, seq.prompt_len)

    def schedule(self, among: list[Sequence] | None = None, admit: int | None = None) -> Plan:
        """The next step's plan. `among`: plan only these running sequences (in admission order;
        None = all), `admit`: take at most this many newcomers (None = as many as fit), for an
        engine that runs groups of sequences in turn."""
        running = self.running if among is None else among
        plan = Plan(decode=[s for s in running if not s.prefilling])
        budget = self.max_step_tokens - len(plan.decode)
        for seq in running:
            if seq.prefilling:
                end = self._chunk_end(seq)
                if end - seq.computed > budget:
                    return plan  # first come, first served: no newcomer overtakes this prompt
                plan.prefill.append((seq, seq.computed, end))
                budget -= end - seq.computed
        while self.waiting and self.cache.num_free and (admit is None or admit > 0):
            if admit is not None:
                admit -= 1
            seq = self.waiting[0]
            end = self._chunk_end(seq)
            if end - seq.computed > budget:
                break
            self.waiting.popleft()
            seq.slot = self.cache.allocate()
            seq.status = Status.RUNNING
            self.running.append(seq)
            plan.prefill.append((seq, seq.computed, end))
            budget -= end - seq.computed
        return plan

    def _fillers(self, slot: int) -> list[Sequence]:
        """The running sequences whose highest one moves down into `slot` when it is freed: all of
        them here (busy slots packed at the bottom); an engine that packs groups of slots apart
        narrows this."""
        return self.running

    def finish(self, seq: Sequence) -> None:
        """Take `seq` out (running or waiting) and free its slot, keeping busy slots packed."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            freed = seq.slot
            top = max(self._fillers(freed), key=lambda s: s.slot, default=None)
            if top is not None and top.slot > freed:
                self.cache.move(top.slot, freed, top.computed)
                freed, top.slot = top.slot, freed
            self.cache.release(freed)
            seq.slot = None
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
