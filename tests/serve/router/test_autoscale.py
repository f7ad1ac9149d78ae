"""`plait serve --min-replicas 0 --max-replicas 2` on loopback: a request wakes a replica from
zero, a step in load scales up within upscale_delay_s (+ 2 s), and idleness scales back to zero."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from plait.serve import Engine, EngineConfig, SamplingParams
from tests.serve.support import API_KEY, ServerProcess, write_run

AUTH = {"Authorization": f"Bearer {API_KEY}"}
UP_S, DOWN_S = 0.5, 1.0


@pytest.fixture(scope="module")
def elastic(tmp_path_factory):
    run, model = write_run(tmp_path_factory.mktemp("elastic") / "tiny")
    server = ServerProcess(run, "--api-key", API_KEY, "--min-replicas", "0", "--max-replicas", "2",
                           "--target-ongoing-requests", "2", "--upscale-delay-s", str(UP_S),
                           "--downscale-delay-s", str(DOWN_S), "--max-seqs", "4", "--prefill-chunk", "16",
                           timeout_s=120)
    yield server, Engine(model, config=EngineConfig(max_seqs=4, prefill_chunk=16))
    server.stop()


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", headers=AUTH, timeout=10).json()


def wait_for(url: str, check, timeout_s: float, what: str) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        h = health(url)
        if check(h):
            return h
        time.sleep(0.05)
    pytest.fail(f"{what} not within {timeout_s:g} s: {h}")


def test_scale_to_zero_and_wake_up(elastic):
    server, engine = elastic
    h = health(server.url)
    assert h["status"] == "ok" and h["target_replicas"] == 0 and h["replicas"] == []
    assert h["autoscaling"]["min_replicas"] == 0
    body = {"model": "tiny", "prompt": "wake up", "max_tokens": 20, "temperature": 0}
    r = httpx.post(f"{server.url}/v1/completions", headers=AUTH, json=body, timeout=180)
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == engine.generate(["wake up"], SamplingParams(max_tokens=20,
                                                                                      temperature=0))[0].text
    h = health(server.url)
    assert any((e["from"], e["to"], e["reason"]) == (0, 1, "a request arrived while scaled to zero")
               for e in h["scale_events"])
    # Idle for downscale_delay_s: back to zero.
    wait_for(server.url, lambda h: h["target_replicas"] == 0 and not h["replicas"], DOWN_S + 15, "scale to zero")


def test_load_step_scales_up_then_down(elastic):
    server, _ = elastic
    stop = threading.Event()
    statuses: list[int] = []
    body = {"model": "tiny", "prompt": "load", "max_tokens": 60, "temperature": 0}

    def client() -> None:
        with httpx.Client(headers=AUTH, timeout=180) as c:
            deadline = time.monotonic() + 240  # bounded, whatever happens to the test
            while not stop.is_set() and time.monotonic() < deadline:
                statuses.append(c.post(f"{server.url}/v1/completions", json=body).status_code)

    threads = [threading.Thread(target=client, daemon=True)]
    threads[0].start()  # one client: one replica
    try:
        wait_for(server.url, lambda h: h["ready_replicas"] == 1, 120, "one ready replica")
        time.sleep(2 * UP_S)
        assert health(server.url)["target_replicas"] == 1
        step = time.time()
        for _ in range(7):  # the step: 8 clients, 4 wanted replicas, clamped to max_replicas = 2
            threads.append(threading.Thread(target=client, daemon=True))
            threads[-1].start()
        h = wait_for(server.url, lambda h: h["target_replicas"] == 2, UP_S + 10, "scale-up")
        up = next(e for e in h["scale_events"] if e["to"] == 2 and e["time"] >= step)
        assert up["time"] - step <= UP_S + 2.0
        h = wait_for(server.url, lambda h: h["ready_replicas"] == 2, 120, "the second replica")
        # The new replica takes its share of the load.
        wait_for(server.url, lambda h: all(r["served"] > 0 for r in h["replicas"]), 30, "load on both")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert statuses and set(statuses) == {200}
    idle = time.time()
    h = wait_for(server.url, lambda h: h["target_replicas"] == 0 and not h["replicas"], 2 * DOWN_S + 20,
                 "scale down to zero")
    downs = [e for e in h["scale_events"] if e["time"] >= idle]
    assert [(e["from"], e["to"]) for e in downs] == [(2, 1), (1, 0)]
    text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    assert 'plait_router_scale_events_total{direction="up"} 3.0' in text  # 0→1, 0→1, 1→2
    assert 'plait_router_scale_events_total{direction="down"} 3.0' in text  # 1→0, 2→1, 1→0
