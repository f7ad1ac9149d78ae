"""The engine's own process behind `plait serve`: it never outlives its server, and when it dies,
only the requests in flight fail: the server stays up and answers 503 until it is restarted."""

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


def test_a_dead_engine_fails_the_streams_in_flight_and_the_server_answers_503(run):
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
        assert "error" in events[-1] and "engine process exited" in events[-1]["error"]["message"], events[-1]
        assert all("error" not in e for e in events[:-1])

        _wait("/health to report the engine down",
              lambda: httpx.get(f"{server.url}/health", timeout=5).status_code == 503)
        r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                       timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_down"
        assert httpx.get(f"{server.url}/v1/models", timeout=5).status_code == 200  # the server still answers
    finally:
        server.stop()
    assert server.proc.returncode is not None


def test_a_model_that_fails_to_load_raises_its_error_in_the_server(tmp_path):
    # spawn: this test process has run parallel tensor operations already.
    with pytest.raises(CheckpointError, match="does not exist"):
        ProcessEngine(tmp_path / "missing", start_method="spawn")
