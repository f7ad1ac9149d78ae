"""Starting a model-parallel replica: tp × pp processes, one torch.distributed group.

The calling process is rank 0: it runs the engine (scheduler, sampling) and its own share of the
model. The other ranks are processes started with torch.multiprocessing (spawn); each loads the
checkpoint itself, keeps its share, and then loops on rank 0's step messages until told to stop.
Gloo on the CPU, NCCL on CUDA (rank r on cuda:r).
"""

from __future__ import annotations

import datetime
import logging
import queue
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from plait.errors import ConfigError, LaunchError
from plait.models.gpt import GPT
from plait.parallel.pipeline.partition import make_partition
import plait.serve.model_parallel.message as message
from plait.serve.model_parallel.schedule import Place, run_step
from plait.serve.model_parallel.shard import StageShard

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 300.0
STEP_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Layout:
    """What every rank needs to build its share, decided once by rank 0."""

    tp: int
    pp: int
    max_seqs: int
    step_tokens: int
    quantum: int
    span_quantum: int
    micro_batches: int
    device: str
    bounds: tuple[tuple[int, int], ...]  # blocks [lo, hi) of each stage

    @property
    def world(self) -> int:
        return self.tp * self.pp

    @property
    def message_size(self) -> int:
        return message.capacity(self.max_seqs, self.step_tokens)


def stage_bounds(model: GPT, pp: int) -> tuple[tuple[int, int], ...]:
    """Blocks of each stage, balanced by FLOPs with the pipeline partitioner of the training side
    (its layer list is [embedding, blocks, head]: the embedding joins stage 0, the head the last)."""
    if pp > model.cfg.n_layer:
        raise ConfigError(f"--pp {pp} exceeds the model's {model.cfg.n_layer} blocks; choose pp ≤ n_layer")
    if pp == 1:
        return ((0, model.cfg.n_layer),)
    part = make_partition(model.pipeline_spec(), pp, cost="flops")
    n = model.cfg.n_layer
    # Layer index i is block i - 1; clamp the embedding and head out of the block range.
    return tuple((min(max(a - 1, 0), n), min(max(b - 1, 0), n)) for a, b in part.bounds)


def device_of(device: str, rank: int) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.device("cuda", rank if dev.index is None else dev.index + rank)
    return dev


def build_shard(model: GPT, layout: Layout, rank: int) -> tuple[StageShard, Place]:
    """This rank's share (collective: every rank creates every tp group, in the same order)."""
    place = Place(rank, layout.tp, layout.pp)
    groups = [dist.new_group(list(range(s * layout.tp, (s + 1) * layout.tp))) if layout.tp > 1 else None
              for s in range(layout.pp)]
    lo, hi = layout.bounds[place.stage]
    shard = StageShard(model, lo, hi, first=place.first, last=place.last, tp_group=groups[place.stage],
                       max_seqs=layout.max_seqs, quantum=layout.quantum, span_quantum=layout.span_quantum)
    return shard, place


def init_group(layout: Layout, rank: int, host: str, port: int, timeout_s: float) -> None:
    backend = "nccl" if torch.device(layout.device).type == "cuda" else "gloo"
    store = dist.TCPStore(host, port, layout.world, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
    dist.init_process_group(backend, store=store, rank=rank, world_size=layout.world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def _worker_main(rank: int, path: str, layout: Layout, port: int, threads: int, sys_path: list[str],
                 reports) -> None:
    """Rank `rank` (> 0): load, join, build its share, then run steps until STOP."""
    sys.path[:] = sys_path
    torch.set_num_threads(threads)
    try:
        from plait.serve.loader import load_for_serving

        dev = device_of(layout.device, rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        model = load_for_serving(path, dev)[0]
        reports.put((rank, "loaded", None))
        init_group(layout, rank, "127.0.0.1", port, STEP_TIMEOUT_S)
        shard, place = build_shard(model, layout, rank)
        dist.barrier()
    except BaseException:  # noqa: BLE001 - rank 0 reports it
        reports.put((rank, "failed", traceback.format_exc()))
        return
    buf = torch.empty(layout.message_size, dtype=torch.int64, device=dev if dev.type == "cuda" else "cpu")
    index = 0  # STEP messages so far: the step's tags (see schedule.tags)
    try:
        while True:
            dist.broadcast(buf, src=0)
            msg = message.decode(buf.cpu())
            for src, dst, length in msg.moves:
                shard.cache.move(src, dst, length)
            if msg.op == message.STOP:
                break
            if msg.op == message.STEP:
                run_step(shard, place, msg.step, msg.micro_batches, index)
                index += 1
    except BaseException:  # noqa: BLE001
        reports.put((rank, "failed", traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


class Workers:
    """Ranks 1 .. world-1 as spawned processes, and rank 0's side of starting and stopping them."""

    def __init__(self, path: str | Path, layout: Layout, threads: int):
        import torch.multiprocessing as mp

        if dist.is_initialized():
            raise ConfigError("this process already belongs to a torch.distributed process group; a "
                              "model-parallel engine starts its own: open it in a process of its own "
                              "(one replica per process)")
        self.layout = layout
        ctx = mp.get_context("spawn")
        self.reports = ctx.Queue()
        self.store = dist.TCPStore("127.0.0.1", 0, layout.world, is_master=True, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT_S))
        self.procs = [ctx.Process(target=_worker_main, name=f"plait-serve-rank{r}", daemon=True,
                                  args=(r, str(path), layout, self.store.port, threads, list(sys.path),
                                        self.reports))
                      for r in range(1, layout.world)]
        for p in self.procs:
            p.start()
        self.joined = False

    def wait_loaded(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Until every worker has loaded the model; raises LaunchError with its traceback if one fails."""
        loaded: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while len(loaded) < len(self.procs):
            try:
                rank, what, detail = self.reports.get(timeout=0.5)
            except queue.Empty:
                dead = [(r + 1, p.exitcode) for r, p in enumerate(self.procs) if not p.is_alive()]
                if dead:
                    self.kill()
                    raise LaunchError(f"model-parallel rank {dead[0][0]} exited with code {dead[0][1]} "
                                      "while loading the model") from None
                if time.monotonic() > deadline:
                    self.kill()
                    raise LaunchError(f"model-parallel ranks {sorted(set(range(1, self.layout.world)) - loaded)} "
                                      f"did not load the model within {timeout_s:.0f} s") from None
                continue
            if what == "failed":
                self.kill()
                raise LaunchError(f"model-parallel rank {rank} failed to start:\n{detail}")
            loaded.add(rank)

    def join(self) -> None:
        """Rank 0 joins the group (the store it hosts is the rendezvous)."""
        backend = "nccl" if torch.device(self.layout.device).type == "cuda" else "gloo"
        dist.init_process_group(backend, store=self.store, rank=0, world_size=self.layout.world,
                                timeout=datetime.timedelta(seconds=STEP_TIMEOUT_S))
        self.joined = True

    def failure(self) -> str | None:
        """A worker's traceback, if one has reported failing."""
        try:
            while True:
                rank, what, detail = self.reports.get_nowait()
                if what == "failed":
                    return f"rank {rank}:\n{detail}"
        except queue.Empty:
            return None

    def stop(self, buf: torch.Tensor | None, timeout_s: float = 30.0) -> None:
        """Tell the workers to stop (a STOP message), wait for them, leave the group."""
        if self.joined:
            try:
                if buf is not None and all(p.is_alive() for p in self.procs):
                    dist.broadcast(buf, src=0)
            finally:
                dist.destroy_process_group()
                self.joined = False
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        if self.joined:
            dist.destroy_process_group()
            self.joined = False
