"""Hangs become errors that name the rank: heartbeats through the job's store.

A peer that stops answering (stopped, swapped out, stuck in a driver) leaves every other rank
blocked in its next collective. plait gives collectives a timeout of `elastic.timeout_s` seconds
(instead of Gloo's 30 minutes), and each rank runs a small thread that bumps its heartbeat
counter in the store every `elastic.heartbeat_s` and watches the others' counters. When a
collective fails, :meth:`Watchdog.guard` turns the error into a :class:`HangError` naming the
ranks whose counters stopped, writes the report to out_dir/elastic/hang.json, and the process
exits with it, so the elastic agent restarts the group.

Counters, not timestamps, so clocks of different nodes never have to agree; keys live in a
namespace fresh for each rendezvous round (or each process group), so a restarted group never
reads an earlier round's counters.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist

from plait.errors import HangError

log = logging.getLogger(__name__)


class Watchdog:
    """Heartbeats of every rank of one process group, in `store` under `namespace`."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, timeout_s: float,
                 heartbeat_s: float = 1.0, namespace: str = "", report_dir: str | Path | None = None):
        self.store = dist.PrefixStore(f"{namespace}/watchdog", store) if namespace else store
        self.rank, self.world_size = rank, world_size
        self.timeout_s, self.heartbeat_s = timeout_s, heartbeat_s
        self.report_dir = Path(report_dir) if report_dir is not None else None
        self._seen: dict[int, tuple[int, float]] = {}  # rank -> (counter, when it last changed)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def silence_s(self) -> float:
        """A peer whose counter has not moved for this long has stopped answering."""
        return 3 * self.heartbeat_s

    def start(self) -> Watchdog:
        self._beat()
        self._thread = threading.Thread(target=self._loop, name="plait-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.heartbeat_s + 1)

    def _beat(self) -> None:
        self.store.add(f"hb/{self.rank}", 1)

    def _loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._beat()
                self._observe()
            except Exception as exc:  # noqa: BLE001 - the store went away: the job is ending
                log.debug("watchdog: store unreachable (%s); stopping heartbeats", exc)
                return

    def _observe(self) -> None:
        now = time.monotonic()
        for r in range(self.world_size):
            if r == self.rank:
                continue
            key = f"hb/{r}"
            count = int(self.store.get(key)) if self.store.check([key]) else 0
            with self._lock:
                last = self._seen.get(r)
                if last is None or last[0] != count:
                    self._seen[r] = (count, now)

    def stalled(self) -> dict[int, float]:
        """{rank: seconds since its heartbeat last moved} of the peers that stopped answering."""
        now = time.monotonic()
        with self._lock:
            return {r: now - when for r, (_, when) in sorted(self._seen.items())
                    if now - when > self.silence_s}

    def report(self, error: BaseException) -> HangError | None:
        """A HangError naming the stalled peers, or None when every peer is still answering."""
        try:
            self._observe()  # the freshest view
        except Exception as exc:  # noqa: BLE001 - the store may be gone with the job
            log.debug("watchdog: last look at the heartbeats failed (%s)", exc)
        stalled = self.stalled()
        if not stalled:
            return None
        who = ", ".join(f"rank {r} (silent {age:.1f} s)" for r, age in stalled.items())
        message = (f"{who} stopped answering: a collective failed after the elastic.timeout_s="
                   f"{self.timeout_s:g} s limit while its heartbeat had stopped (seen from rank "
                   f"{self.rank}; {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''})")
        if self.report_dir is not None:
            self._write_report(stalled, message)
        return HangError(message)

    def _write_report(self, stalled: dict[int, float], message: str) -> None:
        try:
            self.report_dir.mkdir(parents=True, exist_ok=True)
            path = self.report_dir / "hang.json"
            tmp = self.report_dir / f".hang.{os.getpid()}.tmp"
            tmp.write_text(json.dumps({"ranks": sorted(stalled), "reported_by": self.rank,
                                       "time": time.time(), "message": message}))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("could not write the hang report: %s", exc)

    @contextlib.contextmanager
    def guard(self) -> Iterator[Watchdog]:
        """Run the body; an exception raised while a peer is silent becomes a HangError."""
        self.start()
        try:
            yield self
        except Exception as exc:
            hang = self.report(exc)
            if hang is None:
                raise
            log.error("%s", hang)
            raise hang from exc
        finally:
            self.stop()


def job_watchdog(rank: int, world_size: int, timeout_s: float, heartbeat_s: float,
                 report_dir: str | Path | None, namespace: str | None = None) -> Watchdog | None:
    """A watchdog over the job's store (MASTER_ADDR:MASTER_PORT), or None for one process.

    `namespace` is the rendezvous round's; without one, rank 0 draws a fresh id and broadcasts
    it over the initialised default process group (every rank must call this then).
    """
    if world_size <= 1 or "MASTER_ADDR" not in os.environ:
        return None
    if not namespace:
        box = [uuid.uuid4().hex if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        namespace = f"plait/{box[0]}"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(seconds=max(timeout_s, 10.0)))
    return Watchdog(store, rank, world_size, timeout_s, heartbeat_s, namespace, report_dir)
