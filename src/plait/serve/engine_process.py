"""The engine in a process of its own, behind the HTTP server's event loop.

In one process, the engine thread and the event loop share the GIL: the engine gives it up at
every tensor operation (hundreds per step) and must win it back each time, while the event loop
parses requests and writes stream chunks. Under load each delays the other: steps stretch and a
new request waits longer for its first token. Apart, they only trade messages over a pipe: the
server sends requests and cancellations, the engine process sends each step's outputs. (vLLM
splits its API server and engine core the same way.)

:class:`ProcessEngine` has :class:`~plait.serve.async_engine.AsyncEngine`'s interface, so the
HTTP app serves either. The engine process loads the model itself: the server process holds
only the tokenizer (to check requests), never the weights. It ends when the server tells it to,
or when the server's end of the pipe closes (the server died), so it never outlives its server.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing as mp
import os
import signal
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

from plait.errors import EngineDeadError, PlaitError, ServerBusyError
from plait.serve.async_engine import Handle, match_outputs
from plait.serve.engine import Engine, EngineConfig, PromptChecker, RequestOutput
from plait.serve.metrics import ServeMetrics
from plait.serve.params import SamplingParams
from plait.serve.text import Tokenizer

log = logging.getLogger(__name__)

# Requests and cancellations (server → engine process).
ADD, ABORT, STOP = "add", "abort", "stop"
# Replies (engine process → server).
READY, FAILED, STEP = "ready", "failed", "step"


class EngineFront(PromptChecker):
    """What the server keeps of an engine in another process: its name, configuration and the
    request checks that need only the tokenizer."""

    def __init__(self, name: str, config: EngineConfig, tokenizer: Tokenizer, vocab_size: int, context: int):
        super().__init__(tokenizer, vocab_size, context)
        self.name, self.config = name, config


@dataclass
class StepReport:
    """One message of the engine process: a step's outputs, requests that failed, and its queue."""

    outputs: list[RequestOutput]
    failed: list[tuple[str, str]]  # (request id, why)
    waiting: int
    running: int
    received: int  # requests received so far (those sent later are not in `waiting` yet)


class ProcessEngine:
    """An :class:`Engine` loaded and run in a child process; the asyncio side of the pipe."""

    def __init__(self, path: str | Path, config: EngineConfig | None = None, device: str = "cpu",
                 name: str | None = None, metrics: ServeMetrics | None = None, start_timeout_s: float = 600.0,
                 start_method: str | None = None):
        """Start the engine process and wait until its model is loaded. Raises what loading raised
        (a CheckpointError for a bad path, ...), with the same message.

        `start_method`: "fork" (the default where there is one) starts the engine process at
        once, without importing torch again; it is safe from a process that has not yet run
        parallel tensor operations or touched CUDA, as `plait serve` has not. From one that has,
        pass "spawn"."""
        self.metrics = metrics or ServeMetrics()
        method = start_method or ("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        ctx = mp.get_context(method)
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(target=_engine_main, name="plait-engine", daemon=True,
                                 args=(child_conn, self._conn, str(path), config or EngineConfig(), device, name))
        self._proc.start()
        child_conn.close()
        self._handles: dict[str, Handle] = {}
        self._ids = 0
        self._sent = 0  # requests sent to the engine process
        self._waiting_reported = 0
        self._received_reported = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dead = False
        self.died = False  # the engine process ended without being asked to
        self.on_death: Callable[[], None] | None = None  # called once, on the event loop, if it does
        self.engine = self._wait_ready(start_timeout_s)

    def _wait_ready(self, timeout_s: float) -> EngineFront:
        deadline = time.monotonic() + timeout_s
        while not self._conn.poll(0.1):
            if not self._proc.is_alive():
                raise PlaitError(f"the engine process exited while loading the model (exit code "
                                 f"{self._proc.exitcode})")
            if time.monotonic() > deadline:
                self.close()
                raise PlaitError(f"the engine process did not load the model within {timeout_s:g} s")
        try:
            kind, body = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            raise PlaitError(f"the engine process exited while loading the model (exit code "
                             f"{self._proc.exitcode})") from None
        if kind == FAILED:
            self._proc.join(5)
            raise body
        return body

    # --- the interface the HTTP app uses (see AsyncEngine) -----------------------------------

    @property
    def alive(self) -> bool:
        return not self._dead and self._proc.is_alive()

    def start(self) -> None:
        """Listen to the engine process on the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._conn.fileno(), self._on_readable)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the engine process (its requests in flight fail)."""
        if self._loop is not None:
            self._loop.remove_reader(self._conn.fileno())
            self._loop = None
        self.close(timeout)
        self._fail_all("the server is shutting down")

    def close(self, timeout: float = 10.0) -> None:
        """End the engine process: asked first, then terminated if it does not finish in time."""
        if self._proc.is_alive():
            try:
                self._conn.send((STOP, None))
            except OSError:  # it exited meanwhile
                pass
            self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
        self._dead = True

    def submit(self, prompt_ids: list[int], params: SamplingParams, queue: asyncio.Queue,
               tag: Any = None, resume: list[int] | None = None) -> Handle:
        """Queue a checked request (call from the event loop). Raises ServerBusyError when full,
        EngineDeadError when the engine process is not running."""
        params.check(len(prompt_ids), self.engine.context)
        if not self.alive:
            raise EngineDeadError("the engine process is not running")
        waiting = self._waiting()
        if waiting >= self.engine.config.max_queue:
            raise ServerBusyError(f"{waiting} requests are waiting (max_queue="
                                  f"{self.engine.config.max_queue}); retry later")
        self._ids += 1
        handle = Handle(f"cmpl-{self._ids}", queue, asyncio.get_running_loop(), tag)
        self._handles[handle.request_id] = handle
        self._conn.send((ADD, (handle.request_id, prompt_ids, params, resume or [])))
        self._sent += 1
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        self.metrics.queue_depth.set(self._waiting())
        return handle

    def abort(self, handle: Handle) -> None:
        """Cancel a request (from the event loop); its slot is freed before the next step."""
        if handle.finished:
            return
        handle.finished = True
        if self._handles.pop(handle.request_id, None) is not None:
            self.metrics.requests.labels(finish_reason="abort").inc()
            if self.alive:
                self._conn.send((ABORT, handle.request_id))

    # --- replies --------------------------------------------------------------------------------

    def _waiting(self) -> int:
        return self._waiting_reported + self._sent - self._received_reported

    def _on_readable(self) -> None:
        try:
            while self._conn.poll():
                kind, body = self._conn.recv()
                if kind == STEP:
                    self._on_step(body)
        except (EOFError, OSError):
            self._on_exit()

    def _on_step(self, report: StepReport) -> None:
        self._waiting_reported, self._received_reported = report.waiting, report.received
        self.metrics.queue_depth.set(self._waiting())
        self.metrics.running.set(report.running)
        for handle, out in match_outputs(self._handles, report.outputs, self.metrics, time.perf_counter()):
            handle.queue.put_nowait((handle.tag, out))
        for rid, why in report.failed:
            handle = self._handles.pop(rid, None)
            if handle is not None:
                self._fail(handle, RuntimeError(why))

    def _on_exit(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._conn.fileno())
            self._loop = None
        self._dead = self.died = True
        self._proc.join(1)
        log.error("the engine process exited (exit code %s); failing %d requests in flight and stopping",
                  self._proc.exitcode, len(self._handles))
        self._fail_all(f"the engine process exited (exit code {self._proc.exitcode})", EngineDeadError)
        if self.on_death is not None:
            self.on_death()

    def _fail(self, handle: Handle, exc: Exception) -> None:
        handle.finished = True
        self.metrics.requests.labels(finish_reason="error").inc()
        handle.queue.put_nowait((handle.tag, exc))

    def _fail_all(self, why: str, kind: type[Exception] = RuntimeError) -> None:
        for handle in self._handles.values():
            self._fail(handle, kind(why))
        self._handles.clear()


# --- the engine process ---------------------------------------------------------------------------


def _engine_main(conn: Connection, server_end: Connection, path: str, config: EngineConfig, device: str,
                 name: str | None) -> None:
    # A forked child holds a copy of the server's end of the pipe: closed, so that the server's
    # exit (even by SIGKILL) shows here as the end of the pipe.
    server_end.close()
    _die_with_parent()
    # Ctrl-C reaches the whole process group: the server decides when this process stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        engine = Engine.from_path(path, config=config, device=device, name=name)
    except BaseException as exc:  # reported to the server, which raises it
        conn.send((FAILED, _portable(exc)))
        return
    conn.send((READY, EngineFront(engine.name, engine.config, engine.tokenizer, engine.vocab_size, engine.context)))
    gc.collect()
    gc.freeze()  # the model and modules live as long as the process: keep them out of collections
    code = 0
    try:
        _serve_steps(engine, conn)
    except (EOFError, OSError):  # the server is gone
        pass
    except BaseException:
        log.exception("the engine process failed")
        code = 1
    finally:
        engine.close()
        os._exit(code)  # skip the interpreter's teardown of a forked copy of the server's state


def _serve_steps(engine: Engine, conn: Connection) -> None:
    received = 0
    while True:
        # Idle: block until a request comes. Busy: take what has come, then step.
        messages = [conn.recv()] if not engine.has_unfinished() else []
        while conn.poll():
            messages.append(conn.recv())
        failed: list[tuple[str, str]] = []
        for kind, body in messages:
            if kind == STOP:
                return
            if kind == ADD:
                received += 1
                rid, ids, params, resume = body
                try:
                    engine.add_request(ids, params, request_id=rid, resume=resume)
                except Exception as exc:  # checked by the server already; still, never stop serving
                    failed.append((rid, str(exc)))
            elif kind == ABORT:
                engine.abort(body)
        outputs: list[RequestOutput] = []
        if engine.has_unfinished():
            try:
                outputs = engine.step()
            except Exception as exc:  # keep serving: fail what was in flight, free every slot
                log.exception("engine step failed; failing the requests in flight")
                for rid in engine.in_flight():
                    engine.abort(rid)
                    failed.append((rid, f"generation failed: {exc}"))
        conn.send((STEP, StepReport(outputs, failed, engine.num_waiting, engine.num_running, received)))
        if engine.has_unfinished():
            # Give the CPU away for a moment: the server, woken by this send (or by a client's
            # request meanwhile), is often queued on this process's CPU, and this process computes
            # on without blocking, so the server would wait out a time slice first (measured: a
            # new request's bytes unread for 3-5 ms). Alone on its CPU, this process resumes at once.
            _yield_cpu()


_yield_cpu = getattr(os, "sched_yield", lambda: None)


def _die_with_parent() -> None:
    """Linux: SIGTERM when the server process dies, even between steps of a long prefill."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling (plait's errors do), else a PlaitError with its message."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return PlaitError(f"{type(exc).__name__}: {exc}")
