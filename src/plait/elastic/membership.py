"""Membership changes seen from a worker: the batch at the new world size, the round's store
namespace, and where each worker can be found.

When a node leaves or joins, torch's elastic agents stop every worker and start new ones at the
new world size; each new worker resumes from the newest checkpoint (its sampler continues from
the global position of the epoch, so no sample is lost or repeated). What changes with the world
size is decided here:

- the batch: `elastic.batch = "keep"` holds the global batch by recomputing gradient
  accumulation for the new dp; "rescale" keeps accumulation, so the global batch follows dp
  (and `train.lr_scaling` the learning rate);
- the store: keys written in one rendezvous round must never be read in the next (a restarted
  Gloo group reading the previous round's addresses fails with "Connection refused"), so plait's
  agent gives each round a fresh namespace (:data:`NAMESPACE_ENV`) that workers prefix every key
  with.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plait.config import Config
from plait.errors import ConfigError

log = logging.getLogger(__name__)

# Set by plait's elastic agent for its workers: the rendezvous round's store namespace.
NAMESPACE_ENV = "PLAIT_STORE_NAMESPACE"


@dataclass(frozen=True)
class BatchPlan:
    """The batch of one world size: dp ranks × micro_batch_size × grad_accum = global_batch."""

    dp: int
    grad_accum: int
    global_batch: int


def dp_of(cfg: Config, world_size: int) -> int:
    """The data-parallel size of `world_size` processes (pp and tp stay as configured)."""
    p = cfg.parallel
    return p.dp or max(1, world_size // (p.pp * p.tp))


def largest_world(cfg: Config) -> int:
    """Processes at the most nodes the elastic job may have."""
    return cfg.elastic.max_nodes * cfg.elastic.nproc_per_node


def reference_global_batch(cfg: Config) -> int:
    """The global batch "keep" holds: elastic.global_batch, else the configured batch at the
    largest dp (micro_batch_size × grad_accum × dp at max_nodes)."""
    e, t = cfg.elastic, cfg.train
    if e.global_batch:
        return e.global_batch
    return t.micro_batch_size * t.grad_accum * dp_of(cfg, largest_world(cfg))


def batch_plan(cfg: Config, world_size: int) -> BatchPlan:
    """The gradient accumulation and global batch at `world_size` under `elastic.batch`."""
    t, dp = cfg.train, dp_of(cfg, world_size)
    if cfg.elastic.batch == "rescale" or not cfg.elastic.max_nodes:
        return BatchPlan(dp, t.grad_accum, t.micro_batch_size * t.grad_accum * dp)
    target = reference_global_batch(cfg)
    per_draw = t.micro_batch_size * dp
    if target % per_draw:
        raise ConfigError(
            f"elastic.global_batch: the global batch {target} is not a multiple of dp × "
            f"train.micro_batch_size = {dp} × {t.micro_batch_size} at {world_size} processes; "
            f"choose a global batch divisible by every dp the job may run at "
            f"({', '.join(map(str, possible_dps(cfg)))}) times the micro-batch, or elastic.batch = \"rescale\"")
    return BatchPlan(dp, target // per_draw, target)


def possible_dps(cfg: Config) -> list[int]:
    """Every dp the elastic job may run at, from min_nodes to max_nodes nodes."""
    e = cfg.elastic
    return sorted({dp_of(cfg, n * e.nproc_per_node) for n in range(e.min_nodes, e.max_nodes + 1)})


def check_elastic(cfg: Config) -> None:
    """Refuse, before any process starts, an elastic config whose batch cannot be kept at some
    node count, or whose pp × tp does not divide a world size it may run at."""
    e, p = cfg.elastic, cfg.parallel
    if not e.max_nodes:
        return
    if p.dp:
        raise ConfigError(f"parallel.dp={p.dp} is fixed, but an elastic job's dp follows its node count; "
                          "set parallel.dp = 0")
    for n in range(e.min_nodes, e.max_nodes + 1):
        world = n * e.nproc_per_node
        if world % (p.pp * p.tp):
            raise ConfigError(f"elastic: {n} nodes × {e.nproc_per_node} processes = {world} is not a "
                              f"multiple of parallel.pp × parallel.tp = {p.pp * p.tp}")
        batch_plan(cfg, world)


def adapt_to_world(cfg: Config, world_size: int) -> Config:
    """`cfg` with train.grad_accum set for `world_size` (see :func:`batch_plan`)."""
    plan = batch_plan(cfg, world_size)
    if plan.grad_accum == cfg.train.grad_accum:
        return cfg
    log.info("elastic: dp=%d, global batch %d: gradient accumulation %d -> %d", plan.dp,
             plan.global_batch, cfg.train.grad_accum, plan.grad_accum)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=plan.grad_accum))


def store_namespace() -> str | None:
    """This round's store namespace when plait's elastic agent started the worker, else None."""
    return os.environ.get(NAMESPACE_ENV) or None


# --- where the workers are --------------------------------------------------------------------


def workers_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "elastic" / "workers"


def register_worker(out_dir: str | Path, rank: int, world_size: int) -> None:
    """Record this worker's pid, rank and world size (out_dir/elastic/workers/rank<r>.json), so
    that tools and tests can find, signal or watch the workers of the current round."""
    folder = workers_dir(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"rank{rank}.json"
    tmp = folder / f".rank{rank}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"pid": os.getpid(), "rank": rank, "world_size": world_size,
                               "namespace": store_namespace()}))
    os.replace(tmp, path)


def read_workers(out_dir: str | Path) -> dict[int, dict[str, Any]]:
    """{rank: record} of the workers registered under `out_dir` (the newest round's, per rank)."""
    found = {}
    folder = workers_dir(out_dir)
    if folder.is_dir():
        for path in folder.glob("rank*.json"):
            try:
                record = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            found[int(record["rank"])] = record
    return found


def record_round(out_dir: str | Path, world_size: int, step: int) -> None:
    """Append the start of a round (its world size, the step it resumed at, the wall time) to
    out_dir/elastic/rounds.jsonl; rank 0 calls it once the trainer is ready to train."""
    import time

    path = Path(out_dir) / "elastic" / "rounds.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"world_size": world_size, "step": step, "time": time.time(),
                            "namespace": store_namespace()}) + "\n")


def read_rounds(out_dir: str | Path) -> list[dict[str, Any]]:
    """The rounds :func:`record_round` wrote, oldest first."""
    path = Path(out_dir) / "elastic" / "rounds.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
