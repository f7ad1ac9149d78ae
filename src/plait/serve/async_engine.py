"""The engine on a thread of its own, fed by asyncio request handlers.

One thread owns the :class:`Engine` and loops: take new requests and cancellations, run a step,
hand each output to the asyncio queue of the request it belongs to. HTTP handlers never touch
the engine: they submit, then await their queue, so the event loop stays free to accept and
stream while the model computes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from plait.errors import EngineDeadError, ServerBusyError
from plait.serve.engine import Engine, RequestOutput
from plait.serve.metrics import ServeMetrics
from plait.serve.params import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class Handle:
    """A submitted request: its outputs arrive on `queue` as (tag, RequestOutput | Exception)."""

    request_id: str
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    tag: Any = None
    arrival: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    finished: bool = False


class AsyncEngine:
    def __init__(self, engine: Engine, metrics: ServeMetrics | None = None):
        self.engine = engine
        self.metrics = metrics or ServeMetrics()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: list[tuple[Handle, list[int], SamplingParams, list[int]]] = []
        self._aborts: list[str] = []
        self._handles: dict[str, Handle] = {}
        self._waiting = 0  # queued requests (in the inbox or the engine's queue), under the lock
        self._stop = False
        self._thread: threading.Thread | None = None
        self._ids = 0

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="plait-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, prompt_ids: list[int], params: SamplingParams, queue: asyncio.Queue,
               tag: Any = None, resume: list[int] | None = None) -> Handle:
        """Queue a checked request (call from the event loop). Raises ServerBusyError when full,
        EngineDeadError when the engine thread is not running.
        `resume`: tokens already sent by a run elsewhere (see `Engine.add_request`)."""
        params.check(len(prompt_ids), self.engine.context)
        if not self.alive:
            raise EngineDeadError("the engine thread is not running")
        with self._lock:
            if self._waiting >= self.engine.config.max_queue:
                raise ServerBusyError(f"{self._waiting} requests are waiting (max_queue="
                                      f"{self.engine.config.max_queue}); retry later")
            self._ids += 1
            handle = Handle(f"cmpl-{self._ids}", queue, asyncio.get_running_loop(), tag)
            self._inbox.append((handle, prompt_ids, params, resume or []))
            self._waiting += 1
            self.metrics.queue_depth.set(self._waiting)
            self._wake.notify()
        return handle

    def abort(self, handle: Handle) -> None:
        """Cancel a request (from the event loop); its slot is freed before the next step."""
        if handle.finished:
            return
        with self._lock:
            self._aborts.append(handle.request_id)
            self._wake.notify()

    # --- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._stop or self._inbox or self._aborts or self.engine.has_unfinished()):
                    self._wake.wait()
                if self._stop:
                    break
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
            for handle, ids, params, resume in inbox:
                try:
                    self.engine.add_request(ids, params, request_id=handle.request_id, resume=resume)
                except Exception as exc:  # checked on submit already; still, never kill the loop
                    handle.finished = True
                    self._deliver(handle, exc)
                    continue
                self._handles[handle.request_id] = handle
                self.metrics.prompt_tokens.inc(len(ids))
            for rid in aborts:
                handle = self._handles.pop(rid, None)
                if handle is not None and self.engine.abort(rid):
                    handle.finished = True
                    self.metrics.requests.labels(finish_reason="abort").inc()
            try:
                outputs = self.engine.step()
            except Exception as exc:  # keep serving: fail what was in flight, free every slot
                log.exception("engine step failed; failing %d in-flight requests", len(self._handles))
                self._fail_all(exc)
                outputs = []
            self._publish(outputs)
        self._fail_all(RuntimeError("the server is shutting down"))

    def _publish(self, outputs: list[RequestOutput]) -> None:
        now = time.perf_counter()
        with self._lock:
            self._waiting = len(self._inbox) + self.engine.num_waiting
        self.metrics.queue_depth.set(self._waiting)
        self.metrics.running.set(self.engine.num_running)
        ready: dict[asyncio.AbstractEventLoop, list[tuple[Handle, Any]]] = {}
        for handle, out in match_outputs(self._handles, outputs, self.metrics, now):
            ready.setdefault(handle.loop, []).append((handle, out))
        # One wake-up of the event loop per step, not one per token: fewer context switches.
        for loop, items in ready.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for handle, *_ in inbox:
            self._handles[handle.request_id] = handle
        for rid, handle in list(self._handles.items()):
            self.engine.abort(rid)
            handle.finished = True
            self.metrics.requests.labels(finish_reason="error").inc()
            self._deliver(handle, exc)
        self._handles.clear()
        with self._lock:
            self._waiting = len(self._inbox)

    @staticmethod
    def _deliver(handle: Handle, item: RequestOutput | BaseException) -> None:
        try:
            handle.loop.call_soon_threadsafe(handle.queue.put_nowait, (handle.tag, item))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


def match_outputs(handles: dict[str, Handle], outputs: list[RequestOutput], metrics: ServeMetrics,
                  now: float) -> list[tuple[Handle, RequestOutput]]:
    """Pair a step's outputs with their requests' handles (outputs of cancelled requests are
    dropped), and count them in `metrics`: tokens, first tokens, finished requests. A finished
    request's handle leaves `handles`.

    First tokens come first in the list, so their streams are written before the step's other
    tokens: a stream's writes take the event loop 0.1 ms or more each, and a step's newcomers
    (whose prompts run after the decoders' rows) would otherwise wait behind every decoder's."""
    if outputs:
        metrics.record_tokens(len(outputs), now)
    firsts, matched = [], []
    for out in outputs:
        handle = handles.get(out.request_id)
        if handle is None:
            continue
        first = handle.first_token is None
        if first:
            handle.first_token = now
            metrics.ttft.observe(now - handle.arrival)
        if out.finished:
            handle.finished = True
            del handles[out.request_id]
            metrics.record_finish(out.finish_reason, handle.arrival, handle.first_token, now,
                                  out.completion_tokens)
        (firsts if first else matched).append((handle, out))
    return firsts + matched


def _put_all(items: list[tuple[Handle, Any]]) -> None:
    for handle, item in items:
        handle.queue.put_nowait((handle.tag, item))
