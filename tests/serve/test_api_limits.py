"""Timing-dependent behaviour of the HTTP server, made deterministic: streamed tokens arrive
while the request runs, a full queue answers 429, and a client that goes away frees its slot.

The server runs in this process (uvicorn on a thread, loopback) with one slot and a queue of one.
Its engine sleeps 10 ms per step and can be held between steps, so what the tests observe does
not depend on the machine's speed or load.
"""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn

from plait.models import GPT
from plait.serve import Engine, EngineConfig
from plait.serve.api import create_app
from plait.serve.async_engine import AsyncEngine
from plait.serve.server import bind
from tests.serve.support import tiny_gpt_config


class PacedEngine(Engine):
    """The real engine, 10 ms per step, that runs only `allowed` more steps when that is set,
    and fails one step on request."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.allowed: int | None = None
        self.turn = threading.Condition()
        self.fail_next = False  # a fault injected into the next step

    def step(self):
        with self.turn:
            self.turn.wait_for(lambda: self.allowed is None or self.allowed > 0, timeout=30)
            if self.allowed is not None:
                self.allowed -= 1
        time.sleep(0.01)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected fault")
        return super().step()

    def allow(self, steps: int | None) -> None:
        with self.turn:
            self.allowed = steps
            self.turn.notify_all()


@pytest.fixture(scope="module")
def server():
    torch.manual_seed(0)
    engine = PacedEngine(GPT(tiny_gpt_config()), config=EngineConfig(max_seqs=1, max_queue=1, prefill_chunk=64),
                         name="tiny")
    async_engine = AsyncEngine(engine)
    sock = bind("127.0.0.1", 0)
    uv = uvicorn.Server(uvicorn.Config(create_app(async_engine, "tiny"), log_level="warning", ws="none"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + 30
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield url, engine, async_engine.metrics
    uv.should_exit = True
    thread.join(15)
    sock.close()


def wait_for(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def aborted(metrics) -> float:
    return metrics.registry.get_sample_value("plait_requests_total", {"finish_reason": "abort"}) or 0.0


LONG = {"model": "tiny", "prompt": "hold the slot", "max_tokens": 110, "temperature": 0}


def test_streamed_tokens_arrive_while_the_request_runs(server):
    url, engine, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
    engine.allow(1)  # the prompt's one chunk, which yields the first token; then the engine waits
    try:
        stream = client.completions.create(model="tiny", prompt="hello", max_tokens=30, temperature=0,
                                           stream=True, stream_options={"include_usage": True})
        first = next(iter(stream))
        assert first.choices[0].text and first.choices[0].finish_reason is None
        assert engine.has_unfinished()  # 29 tokens to go: this text came before the rest existed
        engine.allow(None)
        rest = list(stream)
    finally:
        engine.allow(None)
    assert rest[-1].choices == [] and rest[-1].usage.completion_tokens == 30
    assert rest[-2].choices[0].finish_reason == "length"


def test_full_queue_is_429_and_a_dropped_stream_frees_its_slot(server):
    url, engine, metrics = server
    before = aborted(metrics)
    queued: dict = {}
    with httpx.Client(timeout=30) as a:
        with a.stream("POST", f"{url}/v1/completions", json={**LONG, "stream": True}) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")  # A runs and holds the only slot
            waiter = threading.Thread(target=lambda: queued.update(
                r=httpx.post(f"{url}/v1/completions", json={**LONG, "max_tokens": 3}, timeout=30)))
            waiter.start()  # B waits in the queue of one
            wait_for(lambda: metrics.queue_depth._value.get() == 1)
            r = httpx.post(f"{url}/v1/completions", json={**LONG, "max_tokens": 3})  # C: no room
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "queue_full"
            assert engine.num_running == 1
        # A's client hung up mid-stream: its slot goes to B, which completes.
    waiter.join(30)
    assert queued["r"].status_code == 200 and queued["r"].json()["usage"]["completion_tokens"] == 3
    assert aborted(metrics) == before + 1


def test_a_client_that_gives_up_frees_its_slot(server):
    url, engine, metrics = server
    before = aborted(metrics)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=LONG, timeout=0.4)
    wait_for(lambda: aborted(metrics) == before + 1)
    wait_for(lambda: engine.num_running == 0 and not engine.has_unfinished())
    r = httpx.post(f"{url}/v1/completions", json={**LONG, "max_tokens": 2}, timeout=30)
    assert r.status_code == 200


def test_a_failing_step_fails_its_requests_and_the_server_goes_on(server):
    url, engine, _ = server
    engine.fail_next = True
    r = httpx.post(f"{url}/v1/completions", json={**LONG, "max_tokens": 5}, timeout=30)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "injected fault" in r.json()["error"]["message"]
    assert not engine.has_unfinished() and engine.cache.num_free == 1
    r = httpx.post(f"{url}/v1/completions", json={**LONG, "max_tokens": 5}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
