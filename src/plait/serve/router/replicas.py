"""Replica processes: started, watched, replaced when they die, drained when scaled away.

Each replica is the single-replica `plait serve` on 127.0.0.1, port 0: it reports the port the
system chose on its first line. The router sees a replica's death three ways, whichever comes
first: its process exits (asyncio's child watcher), a request to it fails to connect or breaks
off, or it stops answering /health. A dead replica is replaced at once while the target count
wants it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import signal
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import httpx

from plait.serve.router.config import RouterConfig
from plait.serve.router.metrics import STATES, RouterMetrics

log = logging.getLogger(__name__)

_URL = re.compile(r" on (http://127\.0\.0\.1:\d+)")
LOG_TAIL = 40  # lines of a replica's output kept to explain a failed start


class NoReplicaError(RuntimeError):
    """No replica could take a request in time (none starts, or every start fails)."""


@dataclass(eq=False)
class Replica:
    id: int
    proc: asyncio.subprocess.Process
    started: float = field(default_factory=time.monotonic)
    url: str | None = None
    state: str = "starting"  # starting → ready ⇄ failed; draining → stopping → (gone)
    ongoing: int = 0
    served: int = 0
    ready_at: float | None = None
    log: collections.deque = field(default_factory=lambda: collections.deque(maxlen=LOG_TAIL))
    tasks: list[asyncio.Task] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def info(self) -> dict[str, Any]:
        return {"id": self.id, "pid": self.pid, "url": self.url, "state": self.state, "ongoing": self.ongoing,
                "served": self.served}


def _die_with_parent() -> None:  # pragma: no cover (runs in the child between fork and exec)
    """Linux: the replica gets SIGTERM if the router dies, even by SIGKILL: no orphans."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ReplicaSet:
    """The router's replicas and their target count; `acquire`/`release` route requests."""

    def __init__(self, command: list[str], env: dict[str, str], api_key: str, config: RouterConfig,
                 metrics: RouterMetrics):
        self.command, self.env, self.config, self.metrics = command, env, config, metrics
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.replicas: list[Replica] = []
        self.target = 0
        self.waiting = 0  # requests held here for want of a ready replica
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=100)
        self.error: str | None = None  # set when replicas keep failing to start: restarts stop
        self._ids = 0
        self._failed_starts = 0
        self._changed = asyncio.Condition()
        self._client: httpx.AsyncClient | None = None
        self._health_task: asyncio.Task | None = None
        self._closing = False

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self, initial: int) -> None:
        """Start `initial` replicas and wait until they are ready (NoReplicaError if they fail)."""
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(5.0), trust_env=False)
        self._health_task = asyncio.create_task(self._health_loop())
        self.set_target(initial, "start")
        if initial:
            await self.wait_ready(initial, self.config.start_timeout_s * self.config.start_failures)

    async def wait_ready(self, n: int, timeout: float) -> None:
        async def ready() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: self.error is not None or self.count("ready") >= n)
        try:
            await asyncio.wait_for(ready(), timeout)
        except TimeoutError:
            raise NoReplicaError(f"fewer than {n} replicas ready after {timeout:g} s") from None
        if self.error is not None:
            raise NoReplicaError(self.error)

    async def close(self) -> None:
        self._closing = True
        if self._health_task is not None:
            self._health_task.cancel()
        for r in list(self.replicas):
            self._stop(r)
        procs = [r.proc for r in self.replicas if r.proc is not None]
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), 10)
        for p in procs:
            if p.returncode is None:
                p.kill()
        if self._client is not None:
            await self._client.aclose()

    # --- counts and scaling -----------------------------------------------------------------

    def count(self, *states: str) -> int:
        return sum(r.state in states for r in self.replicas)

    @property
    def ongoing(self) -> int:
        return sum(r.ongoing for r in self.replicas)

    def set_target(self, n: int, reason: str) -> None:
        """Aim for `n` replicas: start, revive or drain replicas to get there; log the change."""
        if n != self.target:
            before, self.target = self.target, n
            self.events.append({"time": time.time(), "from": before, "to": n, "reason": reason})
            if reason != "start":
                self.metrics.scale_events.labels(direction="up" if n > before else "down").inc()
            log.info("scaling %d → %d replicas (%s)", before, n, reason)
            self.metrics.target.set(n)
        self._reconcile()

    def _active(self) -> list[Replica]:
        return [r for r in self.replicas if r.state in ("starting", "ready", "failed")]

    def _reconcile(self) -> None:
        if self._closing:
            return
        active = self._active()
        more = self.target - len(active)
        if more > 0:
            for r in [r for r in self.replicas if r.state == "draining"][:more]:
                r.state = "ready"  # still running: take it back instead of starting a new one
                more -= 1
            if self.error is None:
                for _ in range(more):
                    self._spawn()
        elif more < 0:
            # Drop replicas still starting first, then the least busy.
            order = sorted(active, key=lambda r: (r.state == "ready", r.ongoing))
            for r in order[:-more]:
                if r.state == "ready":
                    r.state = "draining"
                    r.tasks.append(asyncio.create_task(self._drain(r)))
                else:
                    self._stop(r)
        self._publish()

    def _publish(self) -> None:
        for state in STATES:
            self.metrics.replicas.labels(state=state).set(self.count(state))
        self.metrics.ongoing.set(self.ongoing)
        self.metrics.waiting.set(self.waiting)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # --- processes --------------------------------------------------------------------------

    def _spawn(self) -> None:
        self._ids += 1
        rid = self._ids
        placeholder = Replica(rid, None)  # type: ignore[arg-type]  # its process is being created
        self.replicas.append(placeholder)
        self.metrics.replica_starts.inc()
        placeholder.tasks.append(asyncio.create_task(self._run(placeholder)))

    async def _run(self, r: Replica) -> None:
        """Start replica `r`'s process, wait for its port and /health, then watch it until it exits."""
        kw = {"preexec_fn": _die_with_parent} if sys.platform.startswith("linux") else {}
        try:
            r.proc = await asyncio.create_subprocess_exec(
                *self.command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, env=self.env, **kw)
        except OSError as exc:
            r.log.append(f"cannot start {self.command[0]}: {exc}")
            await self._gone(r, None)
            return
        if r.state == "stopping":  # scaled away while its process was being created
            r.proc.terminate()
        log.info("replica %d: started (pid %d)", r.id, r.pid)
        reader = asyncio.create_task(self._read(r))
        r.tasks.append(reader)
        try:
            await asyncio.wait_for(self._until_ready(r, reader), self.config.start_timeout_s)
        except TimeoutError:
            r.log.append(f"not ready after {self.config.start_timeout_s:g} s")
            self._kill(r)
        except _Exited:
            pass
        code = await r.proc.wait()
        await reader
        await self._gone(r, code)

    async def _read(self, r: Replica) -> None:
        assert r.proc.stdout is not None
        async for raw in r.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            r.log.append(line)
            if r.url is None:
                m = _URL.search(line)
                if m:
                    r.url = m.group(1)
                    continue
            if line:
                log.info("replica %d: %s", r.id, line)

    async def _until_ready(self, r: Replica, reader: asyncio.Task) -> None:
        while r.url is None:
            if reader.done() or r.proc.returncode is not None:
                raise _Exited
            await asyncio.sleep(0.02)
        while not await self._healthy(r, timeout=2.0):
            if r.proc.returncode is not None:
                raise _Exited
            await asyncio.sleep(0.05)
        if r.state != "starting":  # scaled away while starting
            return
        r.state, r.ready_at = "ready", time.monotonic()
        self._failed_starts = 0
        self.metrics.start_time.observe(r.ready_at - r.started)
        log.info("replica %d: ready at %s after %.2f s", r.id, r.url, r.ready_at - r.started)
        self._publish()
        await self._notify()

    async def _gone(self, r: Replica, code: int | None) -> None:
        """Replica `r`'s process ended: forget it, and replace it if that was not asked for."""
        expected = r.state == "stopping"
        r.state = "gone"
        if r in self.replicas:
            self.replicas.remove(r)
        if not expected and not self._closing:
            self.metrics.replica_failures.inc()
            if r.ready_at is None:
                self._failed_starts += 1
                tail = "\n".join(r.log)
                log.warning("replica %d failed to start (exit code %s):\n%s", r.id, code, tail)
                # Once: a start already under way may fail after restarts stopped, and the
                # error should say where they stopped.
                if self._failed_starts >= self.config.start_failures and self.error is None:
                    self.error = (f"{self._failed_starts} replicas in a row failed to start; the last said:\n"
                                  f"{tail}")
                    log.error("%s", self.error)
            else:
                log.warning("replica %d (pid %d) died (exit code %s) with %d requests in flight; replacing it",
                            r.id, r.pid, code, r.ongoing)
        self._reconcile()
        await self._notify()

    def _stop(self, r: Replica) -> None:
        r.state = "stopping"
        if r.proc is not None and r.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                r.proc.terminate()

    def _kill(self, r: Replica) -> None:
        if r.proc is not None and r.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                r.proc.kill()

    async def _drain(self, r: Replica) -> None:
        deadline = time.monotonic() + self.config.drain_timeout_s
        while r.state == "draining" and r.ongoing and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if r.state == "draining":
            log.info("replica %d: drained, stopping", r.id)
            self._stop(r)
            self._publish()

    # --- health -----------------------------------------------------------------------------

    async def _healthy(self, r: Replica, timeout: float) -> bool:
        try:
            resp = await self._client.get(f"{r.url}/health", headers=self.headers, timeout=timeout)
            return resp.status_code == 200
        except httpx.HTTPError:
            return False

    async def _health_loop(self) -> None:
        misses: dict[int, int] = {}
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            checked = [r for r in self.replicas if r.state in ("ready", "failed", "draining") and r.url]
            results = await asyncio.gather(*(self._healthy(r, self.config.health_interval_s * 2) for r in checked))
            for r, ok in zip(checked, results):
                if ok:
                    misses.pop(r.id, None)
                    if r.state == "failed":
                        r.state = "ready"  # a passing failure (a broken connection, not the replica)
                        self._publish()
                        await self._notify()
                    continue
                misses[r.id] = misses.get(r.id, 0) + 1
                if misses[r.id] >= self.config.health_failures or r.state == "failed":
                    log.warning("replica %d (pid %d) does not answer /health; killing it", r.id, r.pid)
                    self._kill(r)

    def suspect(self, r: Replica, why: BaseException) -> None:
        """A request to `r` failed at the transport: route nothing more to it until it proves
        healthy again (or its exit is seen)."""
        if r.state == "ready":
            log.warning("replica %d: request failed (%s: %s); routing around it", r.id, type(why).__name__, why)
            r.state = "failed"
            self._publish()
            asyncio.get_running_loop().create_task(self._recheck(r))

    async def _recheck(self, r: Replica) -> None:
        await asyncio.sleep(0.2)  # a killed process's exit is usually seen by then
        if r.state == "failed" and r.proc.returncode is None:
            if await self._healthy(r, timeout=2.0):
                if r.state == "failed":
                    r.state = "ready"
                    self._publish()
                    await self._notify()
            else:
                self._kill(r)

    # --- routing ----------------------------------------------------------------------------

    async def acquire(self, timeout: float, exclude: Collection[int] = ()) -> Replica:
        """The ready replica with the fewest requests in flight (its count raised by one), other
        than those whose ids are in `exclude`; waits for one to be ready, starting one if the set
        is scaled to zero."""
        deadline = time.monotonic() + timeout
        self.waiting += 1
        self._publish()
        try:
            while True:
                r = self._pick(exclude)
                if r is not None:
                    r.ongoing += 1
                    r.served += 1
                    return r
                if self.error is not None:
                    raise NoReplicaError(self.error)
                if self.target == 0:
                    self.set_target(1, "a request arrived while scaled to zero")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NoReplicaError(f"no replica became ready within {timeout:g} s")
                async with self._changed:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), min(left, 1.0))
        finally:
            self.waiting -= 1
            self._publish()

    def has_ready(self, exclude: Collection[int] = ()) -> bool:
        """Whether a replica other than those in `exclude` is ready now."""
        return self._pick(exclude) is not None

    def _pick(self, exclude: Collection[int] = ()) -> Replica | None:
        ready = [r for r in self.replicas if r.state == "ready" and r.id not in exclude]
        if not ready:
            return None
        # Fewest in flight; among equals the one that served least, so load spreads evenly.
        return min(ready, key=lambda r: (r.ongoing, r.served))

    def release(self, r: Replica) -> None:
        r.ongoing -= 1
        self.metrics.ongoing.set(self.ongoing)


class _Exited(Exception):
    """The replica's process ended before it was ready."""
