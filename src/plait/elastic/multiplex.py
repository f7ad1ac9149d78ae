"""Multiplexing: two (or more) training jobs time-sliced on one set of worker processes.

Each job gets `quantum` optimizer steps in turn, at step boundaries. While a job waits, its
state (parameters, buffers, gradient buckets, optimizer state) is moved off the device to host
memory, and its random-number streams are put aside, so that every job trains exactly as it
would alone: its result is bit-identical to running it by itself on the same processes. The jobs
share the processes and their process group; each keeps its own config, data, checkpoints and
metrics (their `train.out_dir` must differ).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from plait.config import Config
from plait.errors import ConfigError
from plait.mesh import ParallelMesh
from plait.train.run import load_splits
from plait.train.trainer import Trainer

log = logging.getLogger(__name__)


def check_jobs(cfgs: list[Config]) -> None:
    """Refuse jobs that would write over each other or cannot share one mesh."""
    if len(cfgs) < 2:
        raise ConfigError(f"plait multiplex needs at least two configs, got {len(cfgs)}")
    dirs = [c.train.out_dir for c in cfgs]
    for i, d in enumerate(dirs):
        if d in dirs[:i]:
            raise ConfigError(f"train.out_dir={d!r} is used by two multiplexed jobs; give each job its "
                              "own (e.g. --set-b train.out_dir=runs/b)")
    for c in cfgs:
        if c.parallel.ps.servers or c.elastic.max_nodes:
            raise ConfigError("plait multiplex time-slices all-reduce training jobs; "
                              "parallel.ps.servers and elastic.min_nodes/max_nodes must be 0")
    shapes = {(c.parallel.dp, c.parallel.pp, c.parallel.tp) for c in cfgs}
    if len(shapes) > 1:
        raise ConfigError(f"the multiplexed jobs ask for different meshes (parallel.dp, pp, tp) "
                          f"{sorted(shapes)}; they share one mesh, so these must agree")
    devices = {c.train.device for c in cfgs}
    if len(devices) > 1:
        raise ConfigError(f"the multiplexed jobs ask for different train.device values {sorted(devices)}; "
                          "they share the same processes and devices")


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def move_state(trainer: Trainer, device: torch.device) -> None:
    """Move a trainer's model (parameters, buffers), gradient buckets and optimizer state to
    `device`. Parameters keep their identity, so the optimizer still refers to them."""
    for t in list(trainer.model.parameters()) + list(trainer.model.buffers()):
        if t.device != device:
            t.data = t.data.to(device)
            if isinstance(t, torch.nn.Parameter) and t.grad is not None:
                t.grad = t.grad.to(device)
    for state in trainer.optimizer.state.values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and v.device != device and v.dim() > 0:
                state[k] = v.to(device)
    reducer = getattr(trainer.model, "reducer", None)
    for bucket in getattr(reducer, "buckets", []) or []:
        if bucket.buffer.device != device:
            bucket.buffer = bucket.buffer.to(device)


@dataclass
class _Job:
    trainer: Trainer
    rng: tuple[torch.Tensor, torch.Tensor | None]
    summary: dict[str, Any] | None = None
    slices: int = 0
    busy_s: float = 0.0
    switches_s: list[float] = field(default_factory=list)


def run_multiplexed(cfgs: list[Config], mesh: ParallelMesh, quantum: int) -> list[dict[str, Any]]:
    """Train every job of `cfgs` on `mesh`, `quantum` steps at a time in turn; returns each job's
    summary (as Trainer.fit's, plus its slices and the seconds spent switching to it)."""
    if quantum < 1:
        raise ConfigError(f"--quantum {quantum} must be ≥ 1 (optimizer steps per turn)")
    host = torch.device("cpu")
    jobs: list[_Job] = []
    for cfg in cfgs:
        trainer = Trainer(cfg, mesh, *load_splits(cfg))
        # The RNG as the job would find it when its fit() starts alone.
        jobs.append(_Job(trainer, _rng_state(mesh.device)))
        move_state(trainer, host)
    while any(j.summary is None for j in jobs):
        for j in jobs:
            if j.summary is not None:
                continue
            t0 = time.perf_counter()
            move_state(j.trainer, mesh.device)
            _set_rng_state(j.rng, mesh.device)
            j.switches_s.append(time.perf_counter() - t0)
            t1 = time.perf_counter()
            out = j.trainer.fit(until=j.trainer.step + quantum)
            j.busy_s += time.perf_counter() - t1
            j.slices += 1
            if not out.get("paused"):
                out.pop("history", None)
                j.summary = out
            j.rng = _rng_state(mesh.device)
            move_state(j.trainer, host)
    return [{**j.summary, "slices": j.slices, "busy_s": j.busy_s, "switch_s": sum(j.switches_s)}
            for j in jobs]


def multiplex_process(cfg_dicts: list[dict[str, Any]], quantum: int) -> list[dict[str, Any]]:
    """One worker process of `plait multiplex` (what the launcher starts N times)."""
    from plait.config import validate
    from plait.launch import configure_threads, resolve_device

    cfgs = [Config.from_dict(d) for d in cfg_dicts]
    configure_threads()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    device = resolve_device(cfgs[0].train.device)
    p = cfgs[0].parallel
    mesh = ParallelMesh.from_env(dp=p.dp, pp=p.pp, tp=p.tp, device=device,
                                 timeout_s=min(c.elastic.timeout_s for c in cfgs))
    try:
        for cfg in cfgs:
            validate(cfg, mesh.world_size)
        return run_multiplexed(cfgs, mesh, quantum)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
