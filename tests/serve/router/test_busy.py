"""`plait serve --replicas 2` when replicas are full (one slot and a queue of one each): a replica
that answers 429 passes the request on to one with room, and only when every replica is full does
the client get the 429, with Retry-After. The replicas are filled directly, bypassing the router
(with the key the router gave them, read from their environment), with long requests on a model
slow enough that they stay full while the test asks."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import httpx
import pytest

from plait.serve import Engine, EngineConfig, SamplingParams
from tests.serve.support import API_KEY, ServerProcess, tiny_gpt_config, write_run

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc (Linux)")

AUTH = {"Authorization": f"Bearer {API_KEY}"}
LONG = {"model": "slow", "prompt": "keep busy", "max_tokens": 240, "temperature": 0}


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    cfg = tiny_gpt_config(n_layer=8, n_embd=256, block_size=256)  # about 2 ms a token: slow on purpose
    run, model = write_run(tmp_path_factory.mktemp("busy") / "slow", cfg)
    server = ServerProcess(run, "--api-key", API_KEY, "--replicas", "2", "--max-seqs", "1", "--max-queue", "1",
                           "--model-name", "slow", timeout_s=240)
    yield server, Engine(model, config=EngineConfig(max_seqs=1))
    server.stop()


def replicas(url: str) -> list[dict]:
    return httpx.get(f"{url}/health", headers=AUTH, timeout=10).json()["replicas"]


def next_pick(url: str) -> dict:
    """The replica the router sends the next request to: the fewest in flight, then the fewest
    served, then the first listed."""
    return min(replicas(url), key=lambda r: (r["ongoing"], r["served"]))


def busy_retries(url: str) -> float:
    text = httpx.get(f"{url}/metrics", headers=AUTH, timeout=10).text
    m = re.search(r"^plait_router_busy_retries_total ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def replica_auth(replica: dict) -> dict[str, str]:
    """The header with the key the router started `replica` with (PLAIT_API_KEY in its environment)."""
    env = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{replica['pid']}/environ").read_bytes().split(b"\0") if b"=" in kv)
    return {"Authorization": f"Bearer {env[b'PLAIT_API_KEY'].decode()}"}


def fill(replica: dict) -> list[threading.Thread]:
    """Two long requests straight to a replica: one runs in its only slot, one waits in its queue."""
    url, auth = replica["url"], replica_auth(replica)
    threads = [threading.Thread(target=httpx.post, args=(f"{url}/v1/completions",),
                                kwargs={"json": LONG, "headers": auth, "timeout": 120}) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.05)  # in this order: the first takes the slot
    deadline = time.monotonic() + 30
    while "plait_queue_depth 1.0" not in httpx.get(f"{url}/metrics", headers=auth).text:
        assert time.monotonic() < deadline, "the replica did not fill up"
        time.sleep(0.01)
    return threads


def test_a_full_replica_passes_the_request_on(routed):
    server, engine = routed
    target = next_pick(server.url)
    before = busy_retries(server.url)
    threads = fill(target)
    body = {"model": "slow", "prompt": "hello", "max_tokens": 8, "temperature": 0}
    r = httpx.post(f"{server.url}/v1/completions", headers=AUTH, json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == engine.generate(["hello"], SamplingParams(max_tokens=8, temperature=0))[0].text
    assert busy_retries(server.url) == before + 1  # refused by the full one, served by the other
    with httpx.stream("POST", f"{server.url}/v1/completions", headers=AUTH, json={**body, "stream": True},
                      timeout=60) as s:  # a stream too, while the first replica is still full
        assert s.status_code == 200
        assert any(line == "data: [DONE]" for line in s.iter_lines())
    for t in threads:
        t.join(120)


def test_every_replica_full_is_429_with_retry_after(routed):
    server, _ = routed
    threads = [t for r in replicas(server.url) for t in fill(r)]
    r = httpx.post(f"{server.url}/v1/completions", headers=AUTH,
                   json={"model": "slow", "prompt": "x", "max_tokens": 2}, timeout=60)
    assert r.status_code == 429 and r.headers["retry-after"]
    assert r.json()["error"]["code"] == "queue_full"
    for t in threads:
        t.join(120)
    ok = httpx.post(f"{server.url}/v1/completions", headers=AUTH,
                    json={"model": "slow", "prompt": "x", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200  # nothing was left behind
