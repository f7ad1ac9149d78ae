"""Parameter-server training runs: one process's part, and the whole job from the command line.

`plait train CONFIG --nproc N` with `parallel.ps.servers = S` comes here (the all-reduce Trainer
is not involved). Every process builds the model from the same seed; ranks 0 … S−1 serve, the
others train on their slice of each global draw of the data and evaluate on the held-out split.

Like every run, the job writes `<out_dir>/metrics.jsonl`: the step records of the first worker
(step, loss, staleness, waits, held-out loss/accuracy), one every `train.log_interval` steps; a
resumed run drops the records after the step it resumes from. Per-role metrics go to
`<out_dir>/ps/<role>_<rank>/metrics.jsonl`: a start record (with the pid), the same step records
(servers: versions and traffic), and an end record with the totals. Server checkpoints go to
`<out_dir>/checkpoints/server_<i>/`; `plait generate` reads a GPT run's from the run folder.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from plait.config import Config, validate
from plait.data.sampler import ElasticSampler
from plait.errors import CheckpointError
from plait.models.build import build_model as build_plain_model
from plait.parallel.parameter_server.checkpoint import (
    restore_server,
    resume_point,
    save_server,
)
from plait.parallel.parameter_server.layout import PSLayout
from plait.parallel.parameter_server.options import PSOptions
from plait.parallel.parameter_server.server import ParameterServer
from plait.parallel.parameter_server.worker import PSWorker, WorkerEvicted
from plait.train.metrics import MetricsWriter

log = logging.getLogger(__name__)


@dataclass
class WorkerHooks:
    """Optional callbacks into a worker's loop: `before_step(rank, step)` runs before each step
    (a way to model a slow or stalled machine)."""

    before_step: Callable[[int, int], None] | None = None


# --- what is trained ----------------------------------------------------------------------------


def build_model(cfg: Config) -> nn.Module:
    """The plain model named by `model.arch`, initialised from `train.seed`."""
    return build_plain_model(cfg.model, cfg.train.seed)


def build_data(cfg: Config):
    """(train, held-out) datasets; both have `len()` and `batch(indices) -> (x, y)`."""
    if cfg.data.dataset == "digits":
        from plait.data.digits import load_digits_splits
        return load_digits_splits(cfg.data.val_fraction)
    from plait.data.dataset import load_token_splits
    return load_token_splits(cfg.data.path, cfg.model.block_size, cfg.data.val_fraction,
                             cfg.data.cache_dir or None)


@torch.no_grad()
def evaluate(model: nn.Module, val, cfg: Config) -> dict[str, float]:
    """Held-out loss (and accuracy for the classifier) of the current parameters."""
    model.eval()
    device = next(model.parameters()).device
    if cfg.data.dataset == "digits":
        x, y = val.batch(range(len(val)))
        logits, loss = model(x.to(device), y.to(device))
        out = {"val_loss": loss.item(), "val_accuracy": (logits.argmax(-1) == y.to(device)).float().mean().item()}
    else:
        n, b = len(val), cfg.train.micro_batch_size
        losses = []
        for i in range(cfg.train.eval_batches):
            x, y = val.batch([(i * b + j) % n for j in range(b)])
            losses.append(model(x.to(device), y.to(device))[1].item())
        out = {"val_loss": sum(losses) / len(losses)}
    model.train()
    return out


# --- one process --------------------------------------------------------------------------------


def ps_train_process(cfg_dict: dict[str, Any], hooks: WorkerHooks | None = None) -> dict[str, Any]:
    """Entry point of each launched process: joins the job from torchrun's environment."""
    from plait.launch import configure_threads

    cfg = Config.from_dict(cfg_dict)
    configure_threads()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    try:
        return run_ps(cfg, hooks)
    finally:
        dist.destroy_process_group()


def run_ps(cfg: Config, hooks: WorkerHooks | None = None) -> dict[str, Any]:
    """This rank's part of a parameter-server run over the initialised default process group."""
    validate(cfg, dist.get_world_size())
    is_server = dist.get_rank() < cfg.parallel.ps.servers
    opts = PSOptions.from_config(cfg)
    model = build_model(cfg)
    data = None if is_server else build_data(cfg)  # slow set-up first: see PSLayout.build
    layout = PSLayout.build(cfg.parallel.ps.servers)
    out = Path(cfg.train.out_dir)
    role = "server" if layout.is_server else "worker"
    metrics = MetricsWriter(out / "ps" / f"{role}_{layout.rank}")
    metrics.write({"event": "start", "role": role, "rank": layout.rank, "pid": os.getpid(),
                   "time": time.time()})
    try:
        if layout.is_server:
            return _serve(cfg, layout, opts, model, metrics)
        return _work(cfg, layout, opts, model, data, metrics, hooks or WorkerHooks())
    finally:
        metrics.close()


def _serve(cfg: Config, layout: PSLayout, opts: PSOptions, model: nn.Module,
           metrics: MetricsWriter) -> dict[str, Any]:
    root = Path(cfg.train.out_dir) / "checkpoints"
    interval = cfg.checkpoint.interval * (1 if opts.mode == "sync" else layout.n_workers)
    log_every = cfg.train.log_interval * (1 if opts.mode == "sync" else layout.n_workers)

    def on_update(server: ParameterServer) -> None:
        if server.version % log_every == 0:
            metrics.write({"version": server.version, "global_step": server.global_step,
                           "updates": server.stats.updates, "bytes_received": server.stats.bytes_received,
                           "dead_workers": len(server.dead), "time": time.time()})
        if interval and server.version % interval == 0:
            save_server(server, root, cfg.checkpoint.keep, cfg.to_dict())

    server = ParameterServer(model, layout, opts, on_update)
    _resume_server(cfg, server)
    start_version = server.version
    t0 = time.perf_counter()
    stats = server.serve()
    elapsed = time.perf_counter() - t0
    path = save_server(server, root, cfg.checkpoint.keep, cfg.to_dict()) if server.version > start_version else None
    summary = {"event": "end", "role": "server", "rank": layout.rank, "version": server.version,
               "updates": stats.updates, "bytes_received": stats.bytes_received,
               "messages": stats.messages, "polls": stats.polls, "max_staleness": stats.max_staleness,
               "max_ahead": stats.max_ahead, "dead_workers": stats.dead_workers,
               "shard_numel": server.numel, "elapsed_s": elapsed,
               "checkpoint": str(path) if path else None}
    metrics.write(summary)
    return summary


def _resume_server(cfg: Config, server: ParameterServer) -> None:
    choice = cfg.checkpoint.resume
    if choice == "none":
        return
    root = Path(cfg.train.out_dir) / "checkpoints" if choice == "auto" else Path(choice)
    path = resume_point(root, server.layout.server_index, server.layout.n_servers, server.opts.mode)
    if path is None:
        if choice != "auto":
            raise CheckpointError(f"checkpoint.resume={choice!r} holds no server_{server.layout.server_index} "
                                  "checkpoint; point it at a parameter-server run's checkpoints folder")
        return
    restore_server(server, path)


def _work(cfg: Config, layout: PSLayout, opts: PSOptions, model: nn.Module, data,
          metrics: MetricsWriter, hooks: WorkerHooks) -> dict[str, Any]:
    from plait.launch import resolve_device

    t = cfg.train
    # Parameters travel through the servers on the CPU: workers compute there too unless
    # train.device is "cuda" (which must then exist).
    device = resolve_device(t.device) if t.device == "cuda" else torch.device("cpu")
    model.to(device).train()
    torch.manual_seed(t.seed + 7919 * (layout.rank + 1))  # dropout differs per worker
    worker = PSWorker(model, layout, opts)
    step = worker.start()
    # The run's own metrics.jsonl, as every run writes: the first worker's records.
    run_metrics = MetricsWriter(cfg.train.out_dir, enabled=layout.worker_index == 0,
                                resumed_step=step if step else None, fresh=not step)
    try:
        return _work_loop(cfg, layout, model, data, metrics, run_metrics, hooks, worker, step, device)
    finally:
        run_metrics.close()


def _work_loop(cfg: Config, layout: PSLayout, model: nn.Module, data, metrics: MetricsWriter,
               run_metrics: MetricsWriter, hooks: WorkerHooks, worker: PSWorker, step: int,
               device: torch.device) -> dict[str, Any]:
    t = cfg.train
    train, val = data
    sampler = ElasticSampler(len(train), layout.n_workers, layout.worker_index, t.micro_batch_size, seed=t.seed)
    _seek(sampler, step * t.grad_accum)
    start_step, status = step, "finished"
    staleness, ahead, wait_s, bound_wait_s = [], [], 0.0, 0.0
    t0 = time.perf_counter()
    try:
        while step < t.steps:
            if hooks.before_step is not None:
                hooks.before_step(layout.rank, step)
            loss_sum = 0.0
            for _ in range(t.grad_accum):
                x, y = train.batch(sampler.next_indices())
                _, loss = model(x.to(device), y.to(device))
                (loss / t.grad_accum).backward()
                loss_sum += loss.item() / t.grad_accum
            report = worker.push_pull()
            step = report.step
            staleness.append(report.staleness)
            ahead.append(report.ahead)
            wait_s += report.wait_s
            bound_wait_s += report.bound_wait_s
            record = {"step": step, "loss": loss_sum, "staleness": report.staleness, "ahead": report.ahead,
                      "wait_s": report.wait_s, "bound_wait_s": report.bound_wait_s, "time": time.time()}
            if t.eval_interval and step % t.eval_interval == 0:
                record.update(evaluate(model, val, cfg))
            if step % t.log_interval == 0 or "val_loss" in record or step == t.steps:
                metrics.write(record)
                run_metrics.write(record)
        worker.finish()
    except WorkerEvicted as exc:
        log.warning("%s", exc)
        status = "evicted"
    elapsed = time.perf_counter() - t0
    done = step - start_step
    summary = {"event": "end", "role": "worker", "rank": layout.rank, "status": status, "steps": step,
               "max_staleness": max(staleness, default=0),
               "mean_staleness": sum(staleness) / len(staleness) if staleness else 0.0,
               "max_ahead": max(ahead, default=0), "wait_s": wait_s, "bound_wait_s": bound_wait_s,
               "elapsed_s": elapsed,
               "samples_per_s": done * t.micro_batch_size * t.grad_accum / elapsed if elapsed else 0.0}
    if status == "finished":
        summary.update(evaluate(model, val, cfg))  # the servers' final parameters
    metrics.write(summary)
    return summary


def _seek(sampler: ElasticSampler, draws: int) -> None:
    """Put the sampler where it is after `draws` draws (a resumed worker continues its data)."""
    per_epoch = sampler.draws_per_epoch
    sampler.load_state_dict({"epoch": draws // per_epoch, "consumed": (draws % per_epoch) * sampler.draw_size,
                             "seed": sampler.seed, "num_samples": sampler.num_samples})


# --- the whole job, from the command line -------------------------------------------------------


def run_ps_job(cfg: Config, nproc: int) -> list[dict[str, Any]]:
    """Validate, check the data, launch `nproc` processes and return one summary row per rank.

    In async and ssp modes workers may die without ending the job (their rows say so).
    """
    from plait.parallel.parameter_server.launch import launch_tolerant

    validate(cfg, nproc)
    build_data(cfg)  # a missing corpus fails here, before any process starts
    ps = cfg.parallel.ps
    tolerate = range(ps.servers, nproc) if ps.mode != "sync" else ()
    launch_tolerant(ps_train_process, (cfg.to_dict(),), nproc, tolerate=tolerate,
                    log_path=Path(cfg.train.out_dir) / "error.log")
    return read_ps_summary(cfg.train.out_dir)


def read_ps_summary(out_dir: str | Path) -> list[dict[str, Any]]:
    """One row per role from the metrics files: its end record, or what is known of a dead one."""
    rows = []
    for folder in sorted((Path(out_dir) / "ps").glob("*_*"), key=lambda p: int(p.name.split("_")[1])):
        path = folder / "metrics.jsonl"
        if not path.is_file():
            continue
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        # A resumed run appends to the same file: only the last run counts.
        starts = [i for i, r in enumerate(records) if r.get("event") == "start"]
        records = records[starts[-1]:] if starts else records
        end = next((r for r in reversed(records) if r.get("event") == "end"), None)
        if end is not None:
            rows.append(end)
            continue
        steps = [r["step"] for r in records if "step" in r]
        role, rank = folder.name.split("_")
        rows.append({"role": role, "rank": int(rank), "status": "died",
                     "steps": max(steps) if steps else 0})
    return rows
