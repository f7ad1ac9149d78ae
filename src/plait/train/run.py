"""One training process: what `plait train` starts N times, and what torchrun runs.

    torchrun --nproc-per-node 4 -m plait.train.run examples/tiny_gpt.toml --set train.steps=50
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist

from plait.config import Config, load_config, validate
from plait.data.dataset import load_token_splits
from plait.elastic.membership import (
    adapt_to_world,
    record_round,
    register_worker,
    store_namespace,
)
from plait.elastic.preemption import PREEMPTED_EXIT_CODE
from plait.elastic.watchdog import job_watchdog
from plait.launch import configure_threads, launch, resolve_device
from plait.mesh import ParallelMesh
from plait.train.trainer import Callbacks, Trainer

log = logging.getLogger(__name__)


def train_process(cfg_dict: dict[str, Any], show_progress: bool = False) -> dict[str, Any]:
    """Train on this process's share of the mesh; returns the summary (without history)."""
    cfg = Config.from_dict(cfg_dict)
    if cfg.parallel.ps.servers:  # parameter-server training has its own roles and loop
        from plait.parallel.parameter_server.run import ps_train_process
        return ps_train_process(cfg_dict)
    configure_threads()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    device = resolve_device(cfg.train.device)  # "cuda" without CUDA stops here, naming the field
    mesh = ParallelMesh.from_env(dp=cfg.parallel.dp, pp=cfg.parallel.pp, tp=cfg.parallel.tp,
                                 device=device, timeout_s=cfg.elastic.timeout_s)
    try:
        cfg = adapt_to_world(cfg, mesh.world_size)  # elastic.batch at this world size
        if cfg.elastic.max_nodes:
            register_worker(cfg.train.out_dir, mesh.rank, mesh.world_size)
        validate(cfg, mesh.world_size)
        train, val = load_splits(cfg)
        callbacks = Callbacks()
        if show_progress and mesh.is_main:
            from plait.progress import progress_callbacks
            callbacks = progress_callbacks()
        e = cfg.elastic
        watchdog = (job_watchdog(mesh.rank, mesh.world_size, e.timeout_s, e.heartbeat_s,
                                 Path(cfg.train.out_dir) / "elastic", store_namespace())
                    if e.watchdog else None)
        with watchdog.guard() if watchdog else contextlib.nullcontext():
            trainer = Trainer(cfg, mesh, train, val, callbacks)
            if cfg.elastic.max_nodes and mesh.is_main:
                record_round(cfg.train.out_dir, mesh.world_size, trainer.step)
            summary = trainer.fit()
        summary.pop("history", None)
        return summary
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def load_splits(cfg: Config):
    """(training, held-out) data of `cfg.data`: the digits images, or token sequences."""
    if cfg.data.dataset == "digits":
        from plait.data.digits import load_digits_splits
        return load_digits_splits(cfg.data.val_fraction)
    return load_token_splits(cfg.data.path, cfg.model.block_size, cfg.data.val_fraction,
                             cfg.data.cache_dir or None)


def train_locally(cfg: Config, nproc: int) -> dict[str, Any]:
    """Train `cfg` on `nproc` processes of this machine; the main rank's summary."""
    results = launch(train_process, (cfg.to_dict(), True), nproc=nproc,
                     log_path=Path(cfg.train.out_dir) / "error.log")
    return results.get(0) or next(iter(results.values()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one plait training process (run under torchrun)")
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)
    summary = train_process(cfg.to_dict(), show_progress=True)
    if isinstance(summary, dict) and summary.get("preempted"):  # checkpointed: requeue the job
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    main()
