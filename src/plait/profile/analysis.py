"""A run's performance, from its folder: metrics, per-rank trace breakdowns, stragglers, bubble.

:func:`analyse` reads `metrics.jsonl` (the main rank's records) and, when the run was traced,
`profile/rank*.meta.json` and `profile/rank*.trace.json` (plait.profile.capture), and returns an
:class:`Analysis` that the hints, plots and report writer read.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plait.errors import DataError
from plait.mesh import MeshShape
from plait.profile.capture import meta_path
from plait.profile.stragglers import Straggler, find_stragglers, peer_groups, stage_imbalance
from plait.profile.trace import PHASES, StepBreakdown, breakdown, has_gpu_kernels, load_events

DEFAULT_THRESHOLD = 0.2


@dataclass
class RankSummary:
    """One rank's traced steps: seconds per step, each figure the median over the traced steps
    (one step disturbed by the machine does not decide)."""

    rank: int
    coords: dict[str, int]
    steps: list[int]
    step_s: float            # the trace's step windows
    measured_step_s: float   # the trainer's clock for the same steps
    compute_s: float
    comm_s: float
    idle_s: float
    p2p_wait_s: float
    in_flight_s: float
    overlapped_s: float
    phases: dict[str, float]
    breakdowns: list[StepBreakdown] = field(default_factory=list, repr=False)

    @property
    def accounted_s(self) -> float:
        return self.compute_s + self.comm_s + self.idle_s


@dataclass
class Analysis:
    """Everything the report says about one run."""

    run_dir: Path
    metrics: list[dict[str, Any]]
    config: dict[str, Any]
    shape: MeshShape | None = None
    ranks: list[RankSummary] = field(default_factory=list)
    stragglers: list[Straggler] = field(default_factory=list)
    threshold: float = DEFAULT_THRESHOLD
    imbalance: tuple[int, float] | None = None  # pipelines without peers: (busiest stage, × median)
    timeline_step: int | None = None
    gpu: bool = False
    live_stragglers: dict[int, int] = field(default_factory=dict)  # rank -> times flagged live

    @property
    def traced(self) -> bool:
        return bool(self.ranks)

    @property
    def comm_in_flight_s(self) -> float:
        return sum(r.in_flight_s for r in self.ranks)

    @property
    def overlap_share(self) -> float | None:
        """Share of communication in flight that ran while compute went on (None: no comm)."""
        flight = self.comm_in_flight_s
        return sum(r.overlapped_s for r in self.ranks) / flight if flight > 0 else None

    @property
    def trace_bubble(self) -> float | None:
        """Pipelines: the mean idle share of the stages' step (None without pp > 1)."""
        if not self.ranks or self.shape is None or self.shape.pp < 2:
            return None
        return statistics.fmean(r.idle_s / r.step_s for r in self.ranks if r.step_s > 0)

    def metric_mean(self, key: str, steps: list[int] | None = None) -> float | None:
        values = [m[key] for m in self.metrics if isinstance(m.get(key), (int, float))
                  and (steps is None or m.get("step") in steps)]
        return statistics.fmean(values) if values else None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The JSON records of `metrics.jsonl`; a torn last line is skipped."""
    path = run_dir / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def _metas(profile_dir: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(profile_dir.glob("rank*.meta.json")):
        try:
            meta = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{str(path)!r} cannot be read: {exc}; rerun with --profile") from None
        if not isinstance(meta, dict) or "rank" not in meta:
            raise DataError(f"{str(path)!r} is not a plait trace description (no rank)")
        out.append(meta)
    out.sort(key=lambda m: m["rank"])
    # Files of ranks beyond the last traced run's world (an earlier, larger run) are stale.
    world = out[0].get("world_size", len(out)) if out else 0
    return [m for m in out if int(m["rank"]) < world]


def _rank_summary(meta: dict[str, Any], profile_dir: Path) -> tuple[RankSummary, bool]:
    rank = int(meta["rank"])
    trace = profile_dir / meta.get("trace", f"rank{rank}.trace.json")
    if not trace.is_file():
        raise DataError(f"{str(meta_path(profile_dir, rank))!r} names the trace {trace.name!r}, which "
                        "is missing; rerun with --profile")
    events = load_events(trace)
    steps = [int(s) for s in meta.get("steps", [])]
    found = [b for b in breakdown(events, rank) if not steps or b.step in steps]
    if not found:
        raise DataError(f"trace {str(trace)!r} holds no plait/step ranges; it was not written by "
                        "plait train --profile")
    measured = meta.get("step_time_s", {})
    med = lambda xs: statistics.median(xs) if xs else 0.0  # noqa: E731
    summary = RankSummary(
        rank=rank, coords=dict(meta.get("coords", {})), steps=[b.step for b in found],
        step_s=med([b.wall_s for b in found]),
        measured_step_s=med([float(measured[str(b.step)]) for b in found if str(b.step) in measured]),
        compute_s=med([b.compute_s for b in found]), comm_s=med([b.comm_s for b in found]),
        idle_s=med([b.idle_s for b in found]), p2p_wait_s=med([b.p2p_wait_s for b in found]),
        in_flight_s=med([b.in_flight_s for b in found]),
        overlapped_s=med([b.overlapped_s for b in found]),
        phases={p: med([b.phases[p] for b in found]) for p in PHASES}, breakdowns=found)
    return summary, has_gpu_kernels(events)


def analyse(run_dir: str | Path, threshold: float = DEFAULT_THRESHOLD) -> Analysis:
    """Read a run folder (metrics and, when present, traces) into an :class:`Analysis`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run folder {str(run_dir)!r} does not exist; pass the train.out_dir of a run")
    if not threshold > 0:
        raise DataError(f"the straggler threshold must be > 0 (a share, e.g. 0.2), got {threshold}")
    if not (run_dir / "metrics.jsonl").is_file():
        raise DataError(f"{str(run_dir)!r} has no metrics.jsonl; pass the train.out_dir of a plait train run")
    metrics = read_metrics(run_dir)
    analysis = Analysis(run_dir, metrics, config={}, threshold=threshold)
    for m in metrics:
        for r in m.get("stragglers") or []:
            analysis.live_stragglers[int(r)] = analysis.live_stragglers.get(int(r), 0) + 1
    metas = _metas(run_dir / "profile")
    if not metas:
        return analysis
    analysis.config = metas[0].get("config", {})
    shape = metas[0].get("mesh", {})
    analysis.shape = MeshShape(dp=shape.get("dp", 1), pp=shape.get("pp", 1), tp=shape.get("tp", 1))
    for meta in metas:
        summary, gpu = _rank_summary(meta, run_dir / "profile")
        analysis.ranks.append(summary)
        analysis.gpu = analysis.gpu or gpu
    busy = {r.rank: r.compute_s for r in analysis.ranks}
    phases = {r.rank: r.phases for r in analysis.ranks}
    groups = peer_groups(analysis.shape)
    analysis.stragglers = find_stragglers(busy, groups, threshold, phases)
    if all(len(g) == 1 for g in groups):  # a pipeline without replicas: stages differ by design
        stage_busy = [busy.get(g[0], 0.0) for g in groups]
        analysis.imbalance = stage_imbalance(stage_busy)
    first = analysis.ranks[0].breakdowns
    walls = sorted(first, key=lambda b: b.wall_s)
    analysis.timeline_step = walls[len(walls) // 2].step  # the median step: neither best nor worst
    return analysis
