"""The engine's own process behind `plait serve`: it never outlives its server, and when it dies,
the requests in flight fail with `engine_down` (a router runs them elsewhere) and the server stops
with an error, for whatever supervises it to start a new one."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from plait.errors import CheckpointError
from plait.serve.engine_process import ProcessEngine
from tests.serve.support import ServerProcess, write_run


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status  # exited, not yet reaped by whoever adopted it


def _wait(what: str, check, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc (Linux)")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("engine_process") / "tiny")[0]


def test_the_engine_process_ends_with_a_killed_server(run):
    server = ServerProcess(run)
    (engine_pid,) = _children(server.proc.pid)
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=10)
    _wait("the engine process to end", lambda: _gone(engine_pid))


def test_a_dead_engine_fails_the_streams_in_flight_and_stops_the_server(run):
    server = ServerProcess(run, "--max-seqs", "2")
    try:
        (engine_pid,) = _children(server.proc.pid)
        events: list[dict] = []
        first = threading.Event()

        def stream() -> None:
            body = {"model": "tiny", "prompt": "hello", "max_tokens": 100, "stream": True}
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        events.append(json.loads(line[6:]))
                        first.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(30), "no token streamed"
        os.kill(engine_pid, signal.SIGKILL)
        reader.join(30)
        assert not reader.is_alive()
        error = events[-1].get("error")
        assert error and error["code"] == "engine_down" and "engine process exited" in error["message"], events[-1]
        assert all("error" not in e for e in events[:-1])
        server.proc.wait(timeout=30)  # the server stops by itself
    finally:
        server.stop()
    assert server.proc.returncode not in (0, None)
    assert "engine process of tiny died" in "".join(server.log)


def test_a_model_that_fails_to_load_raises_its_error_in_the_server(tmp_path):
    # spawn: this test process has run parallel tensor operations already.
    with pytest.raises(CheckpointError, match="does not exist"):
        ProcessEngine(tmp_path / "missing", start_method="spawn")
