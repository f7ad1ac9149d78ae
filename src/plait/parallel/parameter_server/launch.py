"""Start a parameter-server job's processes on this machine, surviving the loss of workers.

torch's elastic agent (behind :func:`plait.launch.launch` and torchrun) treats the local
processes as one group: when any of them fails it stops all of them, which would defeat the
fault tolerance of async and ssp training. So parameter-server jobs get this small supervisor:
like the agent, it hosts the c10d store and gives every process torchrun's environment (RANK,
WORLD_SIZE, MASTER_ADDR, ...), so the processes run the same code as under torchrun; unlike it,
it lets the ranks in `tolerate` fail while the others go on. Any other failure, or the loss of
every tolerated rank, stops the job with :class:`~plait.errors.LaunchError`.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection

import torch.distributed as dist

from plait.errors import LaunchError
from plait.launch import RankFailure, failure_error, one_line

log = logging.getLogger(__name__)


@dataclass
class LaunchOutcome:
    """Return values of the ranks that finished, and why each tolerated rank failed."""

    results: dict[int, Any] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)  # the traceback, or how it exited
    reasons: dict[int, str] = field(default_factory=dict)  # one line each


def _child(rank: int, nproc: int, port: int, sys_path: list[str], fn: Callable[..., Any],
           args: tuple, results: "mp.Queue") -> None:
    sys.path[:] = sys_path
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        results.put((rank, True, fn(*args)))
    except BaseException as exc:  # noqa: BLE001 - the parent decides what a failure means
        results.put((rank, False, (one_line(exc), traceback.format_exc())))


def launch_tolerant(fn: Callable[..., Any], args: tuple, nproc: int,
                    tolerate: Collection[int] = (), poll_s: float = 0.05,
                    log_path: str | Path | None = None) -> LaunchOutcome:
    """Run `fn(*args)` in `nproc` spawned processes; the ranks in `tolerate` may fail.

    A failure that ends the job is reported in one line (a PlaitError's own message); the
    traceback goes to `log_path` when given.
    """
    if nproc < 1:
        raise LaunchError(f"--nproc {nproc} must be ≥ 1")
    tolerate = set(tolerate)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    results_q: "mp.Queue" = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(r, nproc, store.port, list(sys.path), fn, args, results_q))
             for r in range(nproc)]
    for p in procs:
        p.start()
    outcome = LaunchOutcome()
    try:
        while len(outcome.results) + len(outcome.failures) < nproc:
            _drain(results_q, outcome, tolerate, poll_s, log_path)
            for rank, p in enumerate(procs):
                if rank in outcome.results or rank in outcome.failures or p.is_alive():
                    continue
                _drain(results_q, outcome, tolerate, 0.2, log_path)  # its last words may be in flight
                if rank not in outcome.results and rank not in outcome.failures:
                    _fail(outcome, tolerate, rank, f"process exited with code {p.exitcode}", "", log_path)
            if tolerate and tolerate <= set(outcome.failures):
                raise failure_error([RankFailure(r, outcome.reasons[r], outcome.failures[r])
                                     for r in sorted(outcome.failures)], log_path)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        del store
    return outcome


def _drain(q: "mp.Queue", outcome: LaunchOutcome, tolerate: set[int], timeout: float,
           log_path: str | Path | None = None) -> None:
    while True:
        try:
            rank, ok, value = q.get(timeout=timeout)
        except queue.Empty:
            return
        timeout = 0.0
        if ok:
            outcome.results[rank] = value
        else:
            _fail(outcome, tolerate, rank, *value, log_path)


def _fail(outcome: LaunchOutcome, tolerate: set[int], rank: int, message: str, tb: str = "",
          log_path: str | Path | None = None) -> None:
    """Record a tolerated rank's failure (its traceback, or `message`), or end the job."""
    if rank not in tolerate:
        raise failure_error([RankFailure(rank, message, tb)], log_path)
    log.warning("rank %d failed; the job goes on without it: %s", rank, message)
    outcome.failures[rank] = tb or message
    outcome.reasons[rank] = message

