"""Straggler detection: which rank is slower than its peers, by how much, and in which phase.

In synchronous training every rank's step takes as long as the slowest one's, so step times do
not tell who is slow: busy time does (the step less the time blocked in communication, during
which a fast rank waits for the slow one). Ranks are compared with their peers, the ranks doing
the same work: the same pipeline stage (dp replicas and tp shards). A rank is a straggler when its
busy time exceeds the median of its peers' by more than the threshold; the phase named is the one
where it spends the most time beyond its peers' median.

With no peers (a pipeline without dp or tp) the stages do different work by design: their
difference is reported as stage imbalance instead (:func:`stage_imbalance`).
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from typing import Mapping, Sequence

from plait.mesh import MeshShape

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Straggler:
    """One slow rank: its busy seconds per step against the median of its peers'."""

    rank: int
    busy_s: float
    peers_s: float  # median of its peers' busy seconds
    phase: str | None = None  # where it loses the most time, when phases are known
    phase_excess_s: float = 0.0

    @property
    def ratio(self) -> float:
        return self.busy_s / self.peers_s if self.peers_s > 0 else float("inf")

    def describe(self) -> str:
        text = (f"rank {self.rank} is a straggler: busy {self.busy_s * 1e3:.1f} ms per step, "
                f"{self.ratio:.2f}× the median of its peers ({self.peers_s * 1e3:.1f} ms)")
        if self.phase:
            text += f"; it loses most in {self.phase} (+{self.phase_excess_s * 1e3:.1f} ms)"
        return text


def peer_groups(shape: MeshShape) -> list[list[int]]:
    """Ranks doing the same work: one group per pipeline stage (its dp replicas and tp shards)."""
    return [[shape.rank_of(d, p, t) for d in range(shape.dp) for t in range(shape.tp)]
            for p in range(shape.pp)]


def find_stragglers(busy_s: Mapping[int, float], groups: Sequence[Sequence[int]], threshold: float,
                    phases: Mapping[int, Mapping[str, float]] | None = None) -> list[Straggler]:
    """The ranks busier than (1 + `threshold`) × the median of their group's other ranks.

    `phases` (rank -> {phase: seconds}) names where each straggler loses its time.
    """
    found = []
    for group in groups:
        ranks = [r for r in group if r in busy_s]
        for r in ranks:
            peers = [busy_s[q] for q in ranks if q != r]
            if not peers:
                continue
            median = statistics.median(peers)
            if busy_s[r] <= (1.0 + threshold) * median:
                continue
            phase, excess = None, 0.0
            if phases and r in phases:
                for name, seconds in phases[r].items():
                    others = [phases[q].get(name, 0.0) for q in ranks if q != r and q in phases]
                    extra = seconds - (statistics.median(others) if others else 0.0)
                    if extra > excess:
                        phase, excess = name, extra
            found.append(Straggler(r, busy_s[r], median, phase, excess))
    return sorted(found, key=lambda s: -s.ratio)


def stage_imbalance(stage_busy_s: Sequence[float]) -> tuple[int, float] | None:
    """(busiest stage, its busy time / the median of the other stages') for two or more stages,
    else None."""
    if len(stage_busy_s) < 2:
        return None
    worst = max(range(len(stage_busy_s)), key=lambda s: stage_busy_s[s])
    median = statistics.median(b for s, b in enumerate(stage_busy_s) if s != worst)
    return worst, (stage_busy_s[worst] / median if median > 0 else float("inf"))
