"""A persistent pool of Gloo worker processes for multi-process tests and benchmarks.

Starting processes and forming a process group costs seconds; a pool does it once and then runs
any number of functions on all its ranks: `pool.run(fn, *args)` calls `fn(*args)` on every rank
(with torch.distributed initialised) and returns the list of per-rank results.

A function that raises on some rank, or a rank that does not answer before the deadline, makes
`run` raise :class:`WorkerError` with each failing rank's traceback; the pool is then torn down
(its collectives may be wedged) and restarts on the next call.

The parent hosts the rendezvous store on a port it already holds (as torch's elastic agent does),
so a restart never races another socket for a port that was free a moment earlier. Workers
report their start-up phases, so a start-up that hangs says how far each rank got.

Process groups a task creates (a mesh's dp/tp/pp groups, say) are destroyed when it returns.
Each Gloo group owns a polling thread and sockets; kept across hundreds of tasks they made idle
workers burn CPU in the kernel and slowed everything else on the machine.
"""

from __future__ import annotations

import datetime
import gc
import multiprocessing as mp
import os
import pickle
import queue
import sys
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist

from plait.errors import PlaitError

# Spawning, importing torch and joining the group takes ~2 s on a quiet machine and far longer on
# a loaded one; start-up gets its own deadline so a short task timeout does not fail it.
STARTUP_TIMEOUT_S = 300.0
_PHASE = -2  # task id of start-up progress messages


class WorkerError(PlaitError, RuntimeError):
    """One or more pool ranks failed or hung; the message holds their tracebacks."""


def _live_groups() -> set:
    """Every process group this process holds besides the default one."""
    # No public API lists groups; c10d's own registry is the one source of truth. A torch without
    # it (the name is private) makes this an empty set: groups are then kept, as plain torch does.
    registry = getattr(getattr(dist.distributed_c10d, "_world", None), "pg_map", None)
    groups = set(registry or ())
    groups.discard(dist.group.WORLD)
    return groups


def _destroy_groups(groups: set) -> None:
    for g in groups:
        dist.destroy_process_group(g)
    gc.collect()  # a group's threads and sockets go when its last reference does


def _worker_main(rank: int, world: int, port: int, sys_path: list[str], threads: int,
                 tasks: "mp.Queue", results: "mp.Queue", pg_timeout_s: float) -> None:
    sys.path[:] = sys_path
    # The store lives in the parent; workers join it as clients, like ranks under torchrun.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      TORCHELASTIC_USE_AGENT_STORE="True")
    torch.set_num_threads(threads)
    results.put((_PHASE, rank, True, "joining the process group"))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=pg_timeout_s))
    except Exception:  # report start-up failures like task failures
        results.put((-1, rank, False, traceback.format_exc()))
        return
    results.put((-1, rank, True, None))
    while True:
        item = tasks.get()
        if item is None:
            break
        task_id, payload = item
        before = _live_groups()
        try:
            fn, args, kwargs = pickle.loads(payload)
            out = fn(*args, **kwargs)
            del fn, args, kwargs
            _destroy_groups(_live_groups() - before)
            results.put((task_id, rank, True, out))
        except BaseException:  # noqa: BLE001 - everything goes back to the parent
            results.put((task_id, rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class WorkerPool:
    """`world_size` spawned processes sharing one Gloo process group, kept alive between runs."""

    def __init__(self, world_size: int, timeout_s: float = 120.0, threads: int = 1,
                 startup_timeout_s: float = STARTUP_TIMEOUT_S):
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.threads = threads
        self.startup_timeout_s = startup_timeout_s
        self._procs: list[mp.Process] = []
        self._tasks: list[mp.Queue] = []
        self._results: "mp.Queue | None" = None
        self._store: "dist.TCPStore | None" = None
        self._phase: dict[int, str] = {}
        self._next_id = 0

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._phase = {r: "starting (spawn, import torch)" for r in range(self.world_size)}
        # Collectives time out a little after our own deadline so a wedged rank exits by itself.
        pg_timeout = max(self.timeout_s, self.startup_timeout_s) + 30
        self._procs = [
            ctx.Process(target=_worker_main, daemon=True,
                        args=(r, self.world_size, self._store.port, list(sys.path), self.threads,
                              self._tasks[r], self._results, pg_timeout))
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()
        self._collect(-1, deadline=time.monotonic() + self.startup_timeout_s, what="start-up")

    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float | None = None,
            **kwargs: Any) -> list[Any]:
        """Run `fn(*args, **kwargs)` on every rank; returns results indexed by rank."""
        # Pickled once here, not in each queue's feeder thread, where a failure would be silent.
        # Plain pickle sends tensors by value: one payload serves every rank.
        try:
            payload = pickle.dumps((fn, args, kwargs))
        except Exception as e:
            raise WorkerError(f"cannot send {getattr(fn, '__name__', repr(fn))} to the workers: {e}; "
                              "pass a module-level function and picklable arguments") from e
        if not self._procs or not all(p.is_alive() for p in self._procs):
            self.close()
            self._start()
        task_id = self._next_id
        self._next_id += 1
        for q in self._tasks:
            q.put((task_id, payload))
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        return self._collect(task_id, deadline, what=getattr(fn, "__name__", repr(fn)))

    def _collect(self, task_id: int, deadline: float, what: str) -> list[Any]:
        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        while len(results) + len(errors) < self.world_size:
            # After the first failure give the other ranks a short grace period, then report.
            limit = deadline if not errors else min(deadline, time.monotonic() + 5)
            remaining = limit - time.monotonic()
            try:
                tid, rank, ok, value = self._results.get(timeout=max(0.05, min(remaining, 1.0)))
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()
                        and r not in results and r not in errors]
                for r in dead:
                    errors[r] = f"process exited with code {self._procs[r].exitcode}"
                if time.monotonic() >= limit:
                    break
                continue
            if tid == _PHASE:
                self._phase[rank] = value
                continue
            if tid != task_id:
                continue  # a late answer from a task that already failed
            (results if ok else errors)[rank] = value
        if errors or len(results) < self.world_size:
            silent = [r for r in range(self.world_size) if r not in results and r not in errors]
            parts = [f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())]
            if silent:
                parts.append(f"ranks {silent} did not answer within the deadline (hung)")
                if task_id == -1:
                    parts += [f"rank {r} last reported: {self._phase[r]}" for r in silent]
            self.close()
            raise WorkerError(f"{what} failed on the worker pool of {self.world_size}:\n" + "\n".join(parts))
        return [results[r] for r in range(self.world_size)]

    def close(self) -> None:
        """Stop the workers (politely, then by force)."""
        for q in self._tasks:
            try:
                q.put(None)
            except (ValueError, OSError):
                pass
        for p in self._procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join(timeout=2)
        self._procs, self._tasks, self._results, self._store = [], [], None, None

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
