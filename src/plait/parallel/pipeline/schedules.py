"""Pipeline schedules as per-rank action lists, their rules, and their theoretical bubbles.

An action is F (forward) or B (backward) of one micro-batch through one chunk. Every rank runs
its list in order; the runtime adds the point-to-point transfers each action implies. A schedule
is valid when every rank's order respects the data dependencies (F of chunk g after F of g-1,
B of g after B of g+1 and F of g); :func:`simulate` checks that and counts stashed activations.

- naive: one micro-batch at a time through all stages, forward then backward (plain model
  split with gradient accumulation; one stage busy at a time).
- gpipe: all forwards, then all backwards (Huang et al. 2019). Stashes m micro-batches.
- 1f1b: PipeDream-Flush (Narayanan et al. 2021): p - rank - 1 warm-up forwards, then alternate
  one forward and one backward. Stashes at most p micro-batches.
- interleaved: 1F1B over v chunks per rank (Megatron-LM's virtual pipeline); needs m % p == 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from plait.config import PIPELINE_SCHEDULES, check_schedule

SCHEDULES = PIPELINE_SCHEDULES


@dataclass(frozen=True)
class Action:
    """`kind` "F" or "B" of micro-batch `mb` through global chunk `chunk`."""

    kind: str
    chunk: int
    mb: int

    def __repr__(self) -> str:
        return f"{self.kind}{self.chunk}.{self.mb}"


def build_schedule(schedule: str, stages: int, microbatches: int, virtual_stages: int,
                   rank: int) -> list[Action]:
    """The ordered actions of pipeline rank `rank`."""
    check_schedule(schedule, stages, virtual_stages, microbatches)
    p, m = stages, microbatches
    if schedule == "naive":
        return [a for mb in range(m) for a in (Action("F", rank, mb), Action("B", rank, mb))]
    if schedule == "gpipe":
        return [Action("F", rank, mb) for mb in range(m)] + [Action("B", rank, mb) for mb in range(m)]
    if schedule == "1f1b":
        return _one_f_one_b([Action("F", rank, mb) for mb in range(m)],
                            [Action("B", rank, mb) for mb in range(m)], warmup=min(p - rank - 1, m))
    return _interleaved(p, m, virtual_stages, rank)


def _one_f_one_b(forwards: list[Action], backwards: list[Action], warmup: int) -> list[Action]:
    """Warm-up forwards, then one forward / one backward pairs, then the remaining backwards."""
    out = forwards[:warmup]
    steady = len(forwards) - warmup
    for i in range(steady):
        out += [forwards[warmup + i], backwards[i]]
    return out + backwards[steady:]


def _interleaved(p: int, m: int, v: int, rank: int) -> list[Action]:
    """Megatron-LM's interleaved 1F1B: virtual micro-batch k maps to (chunk, micro-batch)."""
    total = m * v

    def action(kind: str, k: int) -> Action:
        local = (k // p) % v
        if kind == "B":
            local = v - 1 - local
        mb = (k // (p * v)) * p + k % p
        return Action(kind, local * p + rank, mb)

    # Megatron: with m == p every rank warms up fully (the steady phase would have nothing to pair).
    warmup = total if m == p else min((p - rank - 1) * 2 + (v - 1) * p, total)
    return _one_f_one_b([action("F", k) for k in range(total)],
                        [action("B", k) for k in range(total)], warmup)


def theoretical_bubble(schedule: str, stages: int, microbatches: int, virtual_stages: int = 1) -> float:
    """Idle fraction of the step time with equal stages and free communication.

    naive: (p−1)/p. gpipe, 1f1b: (p−1)/(m+p−1). interleaved: (p−1)/(v·m+p−1). These are the
    bubble over the *whole* step; Narayanan et al. (2021) quote the same bubble relative to the
    ideal (bubble-free) time, (p−1)/m and (p−1)/(v·m): see :func:`bubble_vs_ideal`.
    """
    p, m, v = stages, microbatches, virtual_stages
    if schedule == "naive":
        return (p - 1) / p
    if schedule != "interleaved":
        v = 1
    return (p - 1) / (v * m + p - 1)


def bubble_vs_ideal(schedule: str, stages: int, microbatches: int, virtual_stages: int = 1) -> float:
    """Bubble time / ideal compute time (Narayanan et al. 2021's normalisation)."""
    b = theoretical_bubble(schedule, stages, microbatches, virtual_stages)
    return b / (1.0 - b)


@dataclass
class Simulation:
    """Outcome of running every rank's actions with given durations and free communication."""

    finished: bool
    makespan: float
    peak_stashed: list[int]  # per rank: most micro-batch activations held at once
    busy: list[float]        # per rank: time computing

    @property
    def bubble(self) -> float:
        """Mean over ranks of the idle share of the makespan."""
        if not self.makespan:
            return 0.0
        return sum(1.0 - b / self.makespan for b in self.busy) / len(self.busy)


def simulate(schedule: str, stages: int, microbatches: int, virtual_stages: int = 1,
             forward_time: float = 1, backward_time: float = 2) -> Simulation:
    """Event simulation of the schedule with equal stages; `finished` is False on deadlock."""
    plans = [build_schedule(schedule, stages, microbatches, virtual_stages, r) for r in range(stages)]
    return replay(plans, lambda r, a: forward_time if a.kind == "F" else backward_time)


def replay(plans: list[list[Action]], duration: Callable[[int, Action], float]) -> Simulation:
    """Run the ranks' action lists as fast as their data dependencies allow, communication free.

    `duration(rank, action)` gives each action's compute time: unit costs give the textbook
    schedule; the durations a real step measured give the span that step's own compute forced,
    the theoretical bubble for its (possibly unequal) stages.
    """
    p = len(plans)
    chunks = 1 + max((a.chunk for plan in plans for a in plan), default=0)
    pos, free_at = [0] * p, [0.0] * p
    done: dict[tuple[str, int, int], float] = {}  # action -> finish time
    stashed, peak, busy = [0] * p, [0] * p, [0.0] * p
    progressed = True
    while progressed:
        progressed = False
        for r in range(p):
            if pos[r] == len(plans[r]):
                continue
            a = plans[r][pos[r]]
            if a.kind == "F":
                deps = [("F", a.chunk - 1, a.mb)] if a.chunk > 0 else []
            else:
                deps = [("F", a.chunk, a.mb)] + ([("B", a.chunk + 1, a.mb)] if a.chunk < chunks - 1 else [])
            if not all(d in done for d in deps):
                continue
            start = max([free_at[r]] + [done[d] for d in deps])
            cost = duration(r, a)
            free_at[r] = start + cost
            busy[r] += cost
            done[(a.kind, a.chunk, a.mb)] = free_at[r]
            stashed[r] += 1 if a.kind == "F" else -1
            peak[r] = max(peak[r], stashed[r])
            pos[r] += 1
            progressed = True
    finished = all(pos[r] == len(plans[r]) for r in range(p))
    return Simulation(finished, max(free_at), peak, busy)
