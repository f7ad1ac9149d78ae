"""What the trainer calls around its steps: communication timing, live straggler statistics,
traces of chosen steps, and training on uneven hardware.

    prepared = prepare_model(model, cfg, mesh)       # before parallelize: slow knob, stage speeds
    model = parallelize(model, mesh, prepared.parallel)
    perf = PerfSession(cfg, mesh, model, sampler, out_dir, start_step)
    with perf.running():
        with perf.step(n):
            ... one training step, its phases under perf.phase("data") ...
        record.update(perf.after_step(n))

Every rank makes the same calls at the same steps: the statistics and the uneven split are agreed
through one small all-gather every `straggler_interval` steps (and once for the split).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch.nn as nn

from plait.config import Config, ParallelConfig
from plait.data.sampler import ElasticSampler
from plait.errors import PlanError
from plait.mesh import ParallelMesh
from plait.profile.balance import (dp_speeds, gather_floats, measure_speed, replica_speeds,
                                   sample_weights, split_counts, stage_speeds)
from plait.profile.capture import TraceCapture
from plait.profile.comm import CommTap
from plait.profile.phases import STEP, phase
from plait.profile.slow import SlowDown
from plait.profile.stragglers import find_stragglers, peer_groups

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """What :func:`prepare_model` did: the [parallel] config to build with, and the slow knob."""

    parallel: ParallelConfig
    slow: SlowDown | None = None


def prepare_model(model: nn.Module, cfg: Config, mesh: ParallelMesh) -> Prepared:
    """Before `parallelize`: install the testing slow-down on its rank and, for a pipeline with
    `profile.balance = "speed"`, set `parallel.stage_speeds` from the given or measured speeds.

    Collective when speeds are measured (every rank measures itself; one all-gather).
    """
    f, parallel = cfg.profile, cfg.parallel
    slow = None
    if f.slow_rank == mesh.rank and f.slow_factor > 1.0:
        slow = SlowDown(model, f.slow_factor, f.slow_phase)
        log.warning("rank %d is slowed %.3g× in %s (profile.slow_rank: a testing knob)",
                    mesh.rank, f.slow_factor, f.slow_phase)
    if f.balance == "speed" and mesh.pp_size > 1 and not parallel.stage_speeds:
        if f.speeds:
            rank_speeds = list(f.speeds)
        else:
            mine = measure_speed(model, cfg.train.micro_batch_size)
            rank_speeds = [row[0] for row in gather_floats([mine], mesh.device)]
        speeds = stage_speeds(rank_speeds, mesh.shape)
        top = max(speeds)
        parallel = dataclasses.replace(parallel, stage_speeds=[s / top for s in speeds])
        if mesh.is_main:
            log.info("uneven hardware: pipeline stage speeds %s (%s)",
                     ", ".join(f"{s:.3g}" for s in parallel.stage_speeds),
                     "given" if f.speeds else "measured")
    return Prepared(parallel, slow)


class PerfSession:
    """The trainer's performance bookkeeping over a run (see the module docstring)."""

    def __init__(self, cfg: Config, mesh: ParallelMesh, model: nn.Module, sampler: ElasticSampler,
                 out_dir: str | Path, start_step: int = 0):
        self.cfg, self.f, self.mesh = cfg, cfg.profile, mesh
        self.model, self.sampler = model, sampler
        self.tap = CommTap(mesh)
        self.start_step = start_step
        self.capture: TraceCapture | None = None
        if self.f.steps:
            meta = {"config": cfg.to_dict(), "start_step": start_step}
            self.capture = TraceCapture(Path(out_dir) / "profile", mesh, model, self.tap,
                                        start_step + self.f.start, self.f.steps, meta)
        self.split: list[int] | None = None
        self.weight = 1.0  # this rank's gradient (and loss) weight in the dp average
        self._busy: list[float] = []  # busy seconds of the steps since the last statistics
        self._step_s: list[float] = []
        self._balance_work: list[float] = []  # forward + backward seconds measured for the split
        self._work = 0.0  # this step's forward + backward seconds, less communication
        self._active = False
        self._pending: dict[str, Any] = {}
        self._uneven = self.f.balance == "speed" and mesh.dp_size > 1
        if self._uneven and self.f.speeds:  # given speeds: split from the first step
            self._apply_split(replica_speeds(self.f.speeds, mesh.shape), "given")

    # --- the run ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def running(self) -> Iterator["PerfSession"]:
        """Time communication for the run (when statistics, traces or a measured split need it);
        stop any trace still open when it ends."""
        f = self.f
        needed = f.straggler_interval > 0 or f.steps > 0 or (self._uneven and not f.speeds)
        self._active = needed
        try:
            with self.tap if needed else contextlib.nullcontext():
                yield self
        finally:
            self._active = False
            if self.capture is not None:
                self.capture.close()

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        """A named range in the trace while a step is traced; otherwise nothing."""
        return phase(name, self.tap.annotate)

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        """Around the step's forward and backward: the work that grows with the batch, which
        speeds are measured on (the optimizer step and data loading do not shrink with a smaller
        share of the batch)."""
        blocked, t0 = self.tap.blocked_s, time.perf_counter()
        yield
        self._work += max(0.0, time.perf_counter() - t0 - (self.tap.blocked_s - blocked))

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Around global step `step` (1-based): traces it when chosen, measures its busy time."""
        tracing = self.capture is not None and self.capture.wants(step)
        if tracing:
            self.capture.begin(step)
        blocked, t0 = self.tap.blocked_s, time.perf_counter()
        self._work = 0.0
        with phase(f"{STEP}{step}", tracing):
            yield
        dt = time.perf_counter() - t0
        busy = max(0.0, dt - (self.tap.blocked_s - blocked)) if self._active else dt
        self._busy.append(busy)
        self._step_s.append(dt)
        if self._uneven and self.split is None:
            self._balance_work.append(self._work or busy)
        if tracing:
            self.capture.end(step, dt)

    def after_step(self, step: int) -> dict[str, Any]:
        """After global step `step`: live statistics and the uneven split when due (collective on
        every rank at the same steps); returns fields for the step's metrics record."""
        out: dict[str, Any] = {}
        every = self.f.straggler_interval
        if every and step % every == 0 and self._busy and self.mesh.world_size > 1:
            out.update(self._statistics(step))
        if (self._uneven and self.split is None
                and len(self._balance_work) >= self.f.balance_steps):
            self._measure_and_split()
        out.update(self._pending)
        self._pending = {}
        return out

    # --- live straggler statistics ------------------------------------------------------------

    def _statistics(self, step: int) -> dict[str, Any]:
        mine = [statistics.fmean(self._busy), statistics.fmean(self._step_s)]
        rows = gather_floats(mine, self.mesh.device)
        self._busy, self._step_s = [], []
        busy = {r: row[0] for r, row in enumerate(rows)}
        found = find_stragglers(busy, peer_groups(self.mesh.shape), self.f.straggler_threshold)
        if self.mesh.is_main:
            for s in found:
                log.warning("step %d: %s", step, s.describe())
        return {"rank_busy_s": [row[0] for row in rows], "rank_step_s": [row[1] for row in rows],
                "stragglers": [s.rank for s in found]}

    # --- uneven hardware ----------------------------------------------------------------------

    def _measure_and_split(self) -> None:
        """Speeds from the measured steps (median forward + backward time per rank), then the split."""
        work = statistics.median(self._balance_work)
        rows = gather_floats([work, float(self._samples_per_step())], self.mesh.device)
        speeds = dp_speeds([r[0] for r in rows], [int(r[1]) for r in rows], self.mesh.shape)
        self._apply_split(speeds, "measured")

    def _samples_per_step(self) -> int:
        return self.sampler.local_batch * self.cfg.train.grad_accum

    def _apply_split(self, speeds: list[float], how: str) -> None:
        counts = split_counts(self.sampler.draw_size, speeds)
        reducer = getattr(self.model, "reducer", None)
        if reducer is None:
            raise PlanError("profile.balance = \"speed\" needs the data-parallel gradient reducer to "
                            "weight gradients by sample count (parallel.zero 0 or 1, no parameter server)")
        self.split = counts
        self._pending["dp_split"] = list(counts)
        self.sampler.set_split(counts)
        self.weight = sample_weights(counts)[self.mesh.dp_rank]
        reducer.set_sample_weight(self.weight)
        if self.mesh.is_main:
            top = max(speeds)
            log.info("uneven hardware: each draw of %d sequences split %s over dp ranks (%s speeds %s)",
                     self.sampler.draw_size, counts, how, ", ".join(f"{s / top:.3g}" for s in speeds))
