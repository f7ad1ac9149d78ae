"""Reading plait's traces: each traced step of each rank split into compute, communication and idle.

A step's window is its ``plait/step N`` range on the training thread. Inside it:

- communication: time the thread spends inside a collective call or waiting on an asynchronous
  one (``plait/comm ...``, ``plait/wait ...`` of collectives): exposed communication;
- idle: time waiting for a pipeline neighbour (``plait/wait`` of point-to-point transfers, the
  bubble), and time covered by no recorded work at all;
- compute: the rest of the time covered by recorded ops and plait's phases, attributed to the
  phase around it (data, forward, backward, optimizer; other outside them).

The three partition the window, so they add up to the step time. Collectives also run on the
backend's own threads (Gloo's ``gloo:*`` ranges, NCCL kernels on a GPU): their union is the time
communication was in flight, and the part of it that ran while the training thread computed is
the overlap. This is plait's own analysis of CPU (Gloo) traces; GPU kernels are left to
Holistic Trace Analysis (plait.profile.hta).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plait.errors import DataError
from plait.profile.comm import COMM_PREFIX, P2P, WAIT_PREFIX
from plait.profile.intervals import Intervals, clip, intersect, length, subtract, union
from plait.profile.phases import BACKWARD, DATA, FORWARD, OPTIMIZER, PP_BACKWARD, PP_FORWARD, STEP

PHASES = ("data", "forward", "backward", "optimizer", "other")
_STEP = re.compile(re.escape(STEP) + r"(\d+)$")
_P2P_WORDS = set(P2P) | {"batch_isend_irecv"}


@dataclass
class StepBreakdown:
    """One rank's account of one step; seconds, times relative to the step's start."""

    rank: int
    step: int
    wall_s: float
    compute_s: float
    comm_s: float
    idle_s: float
    phases: dict[str, float]           # compute seconds per phase (PHASES)
    p2p_wait_s: float = 0.0            # part of idle spent waiting for a pipeline neighbour
    in_flight_s: float = 0.0           # collectives running on the backend's threads
    overlapped_s: float = 0.0          # ... of which while the training thread computed
    segments: list[tuple[float, float, str]] = field(default_factory=list)  # (start, end, kind)

    @property
    def busy_s(self) -> float:
        return self.compute_s


def _phase_of(name: str) -> str | None:
    if name == DATA:
        return "data"
    if name == FORWARD or name.startswith(PP_FORWARD):
        return "forward"
    if name == BACKWARD or name.startswith(PP_BACKWARD):
        return "backward"
    if name == OPTIMIZER:
        return "optimizer"
    return None


def _is_p2p(name: str) -> bool:
    return name.split(" ", 2)[1] in _P2P_WORDS if name.count(" ") >= 1 else False


def is_backend_comm(event: dict[str, Any]) -> bool:
    """A collective as the backend runs it: Gloo's ranges, or an NCCL kernel on a GPU stream."""
    name = event.get("name", "")
    return name.startswith("gloo:") or (event.get("cat") == "kernel" and "nccl" in name.lower())


def load_events(path: str | Path) -> list[dict[str, Any]]:
    """The complete ("X") events of a Chrome trace file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"trace {str(path)!r} cannot be read as a Chrome trace (JSON): {exc}") from None
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise DataError(f"trace {str(path)!r} has no traceEvents list; pass a torch.profiler Chrome trace")
    return [e for e in events if isinstance(e, dict) and e.get("ph") == "X" and "ts" in e and "dur" in e]


def has_gpu_kernels(events: list[dict[str, Any]]) -> bool:
    return any(e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") for e in events)


def breakdown(events: list[dict[str, Any]], rank: int) -> list[StepBreakdown]:
    """Every ``plait/step N`` of one rank's trace, split as the module docstring says."""
    steps = [(int(m.group(1)), e) for e in events if (m := _STEP.match(e.get("name", "")))]
    if not steps:
        return []
    main_tid = steps[0][1]["tid"]
    main = [e for e in events if e["tid"] == main_tid]
    span = lambda e: (float(e["ts"]), float(e["ts"]) + float(e["dur"]))  # noqa: E731
    comm_spans, p2p_spans, covered = [], [], []
    phase_spans: dict[str, list[tuple[float, float]]] = {p: [] for p in PHASES if p != "other"}
    for e in main:
        name = e.get("name", "")
        if name.startswith((COMM_PREFIX, WAIT_PREFIX)):
            # Posting point-to-point transfers is communication; waiting for them is the bubble.
            (p2p_spans if name.startswith(WAIT_PREFIX) and _is_p2p(name) else comm_spans).append(span(e))
        elif _STEP.match(name) or name.startswith("ProfilerStep#"):
            continue
        else:
            kind = _phase_of(name)
            if kind is not None:
                phase_spans[kind].append(span(e))
            covered.append(span(e))
    comm_all, p2p_all, covered_all = union(comm_spans), union(p2p_spans), union(covered)
    phase_all = {k: union(v) for k, v in phase_spans.items()}
    backend = union(span(e) for e in events if is_backend_comm(e))
    out = []
    for number, e in sorted(steps, key=lambda x: x[0]):
        lo, hi = span(e)
        comm = clip(comm_all, lo, hi)
        p2p = subtract(clip(p2p_all, lo, hi), comm)
        compute = subtract(subtract(clip(covered_all, lo, hi), comm), p2p)
        phases, rest = {}, compute
        for kind in ("data", "forward", "backward", "optimizer"):
            mine = intersect(rest, phase_all[kind])
            phases[kind] = length(mine) / 1e6
            rest = subtract(rest, mine)
        phases["other"] = length(rest) / 1e6
        wall = (hi - lo) / 1e6
        compute_s, comm_s = length(compute) / 1e6, length(comm) / 1e6
        flight = clip(backend, lo, hi)
        out.append(StepBreakdown(
            rank=rank, step=number, wall_s=wall, compute_s=compute_s, comm_s=comm_s,
            idle_s=max(0.0, wall - compute_s - comm_s), phases=phases, p2p_wait_s=length(p2p) / 1e6,
            in_flight_s=length(flight) / 1e6, overlapped_s=length(intersect(flight, compute)) / 1e6,
            segments=_segments(lo, hi, compute, comm, p2p, phase_all)))
    return out


def _segments(lo: float, hi: float, compute: Intervals, comm: Intervals, p2p: Intervals,
              phase_all: dict[str, Intervals]) -> list[tuple[float, float, str]]:
    """The step as labelled spans for a timeline: compute by phase, comm, bubble, idle."""
    parts: list[tuple[float, float, str]] = []
    rest = compute
    for kind in ("data", "forward", "backward", "optimizer"):
        mine = intersect(rest, phase_all[kind])
        parts += [(a, b, kind) for a, b in mine]
        rest = subtract(rest, mine)
    parts += [(a, b, "other") for a, b in rest]
    parts += [(a, b, "communication") for a, b in comm]
    parts += [(a, b, "bubble") for a, b in p2p]
    busy = union([(a, b) for a, b, _ in parts])
    parts += [(a, b, "idle") for a, b in subtract([(lo, hi)], busy)]
    return sorted(((a - lo) / 1e6, (b - lo) / 1e6, k) for a, b, k in parts)
