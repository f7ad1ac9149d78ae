"""Trace capture: torch.profiler over chosen training steps on every rank, plait's phases named.

Each rank writes `profile/rank<R>.trace.json` (a Chrome trace: open it in Perfetto or
chrome://tracing; Holistic Trace Analysis reads it too) and `profile/rank<R>.meta.json`: its place
on the mesh, the steps traced and their step times as the trainer measured them, the run's config,
so `plait report` can check the trace against the clock. The step before the first traced one
runs under the profiler as its warm-up (torch.profiler's schedule), so start-up costs stay out.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from plait.mesh import ParallelMesh
from plait.profile.comm import CommTap
from plait.profile.phases import PhaseNames

log = logging.getLogger(__name__)


def trace_path(profile_dir: str | Path, rank: int) -> Path:
    return Path(profile_dir) / f"rank{rank}.trace.json"


def meta_path(profile_dir: str | Path, rank: int) -> Path:
    return Path(profile_dir) / f"rank{rank}.meta.json"


class TraceCapture:
    """Profiles global steps `first` .. `first + steps - 1` of this rank (the trainer's numbering)."""

    def __init__(self, profile_dir: str | Path, mesh: ParallelMesh, model: torch.nn.Module,
                 tap: CommTap, first: int, steps: int, meta: dict[str, Any]):
        self.dir = Path(profile_dir)
        self.mesh, self.model, self.tap = mesh, model, tap
        self.first, self.last = first, first + steps - 1
        self.warmup = 1 if first >= 2 else 0
        self.meta = meta
        self.step_times: dict[int, float] = {}
        self._prof: profile | None = None
        self._names: PhaseNames | None = None
        self.done = False

    def wants(self, step: int) -> bool:
        """Whether global step `step` runs under the profiler (traced, or its warm-up)."""
        return not self.done and self.first - self.warmup <= step <= self.last

    def traced(self, step: int) -> bool:
        return self.first <= step <= self.last

    def begin(self, step: int) -> None:
        """Before step `step` (call only when :meth:`wants` it): start the profiler on the first."""
        if self._prof is None:
            activities = [ProfilerActivity.CPU]
            if self.mesh.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self.dir.mkdir(parents=True, exist_ok=True)
            self._prof = profile(activities=activities,
                                 schedule=schedule(wait=0, warmup=self.warmup, active=self.last - self.first + 1),
                                 on_trace_ready=self._export, acc_events=True)
            self._names = PhaseNames(self.model)
            self.tap.annotate = True
            self._prof.start()
        self._names.new_step()

    def end(self, step: int, step_time_s: float) -> None:
        """After step `step`: record its time; after the last, write the trace and stop."""
        if self.traced(step):
            self.step_times[step] = step_time_s
        self._prof.step()
        if step >= self.last:
            self._finish()

    def _export(self, prof: profile) -> None:
        path = trace_path(self.dir, self.mesh.rank)
        prof.export_chrome_trace(str(path))
        log.info("rank %d: trace of steps %d-%d written to %s", self.mesh.rank, self.first, self.last, path)

    def _finish(self) -> None:
        self._prof.stop()
        self._prof = None
        self.tap.annotate = False
        if self._names is not None:
            self._names.remove()
            self._names = None
        self.done = True
        mesh = self.mesh
        meta = {**self.meta, "rank": mesh.rank, "world_size": mesh.world_size,
                "mesh": {"dp": mesh.dp_size, "pp": mesh.pp_size, "tp": mesh.tp_size},
                "coords": mesh.coords, "device": str(mesh.device),
                "steps": sorted(self.step_times),
                "step_time_s": {str(k): v for k, v in sorted(self.step_times.items())},
                "trace": trace_path(self.dir, mesh.rank).name}
        meta_path(self.dir, mesh.rank).write_text(json.dumps(meta, indent=1) + "\n")

    def close(self) -> None:
        """Stop early (the run ended before the last traced step): keep what was recorded."""
        if self._prof is not None:
            self._finish()
