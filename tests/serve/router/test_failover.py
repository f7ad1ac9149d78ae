"""`plait serve --replicas 2` on loopback: the router speaks the one-server API, spreads requests,
and loses nothing when a replica is killed mid-load (streams continue where they were)."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from plait.serve import Engine, EngineConfig, SamplingParams
from tests.serve.support import API_KEY, ServerProcess, write_run

AUTH = {"Authorization": f"Bearer {API_KEY}"}
ENGINE = dict(max_seqs=4, prefill_chunk=16)


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    run, model = write_run(tmp_path_factory.mktemp("router") / "tiny")
    server = ServerProcess(run, "--api-key", API_KEY, "--replicas", "2", "--max-seqs", "4", "--prefill-chunk", "16",
                           timeout_s=240)
    yield server, Engine(model, config=EngineConfig(**ENGINE))
    server.stop()


@pytest.fixture(scope="module")
def client(routed):
    return openai.OpenAI(base_url=f"{routed[0].url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", headers=AUTH, timeout=10).json()


def expected(engine: Engine, prompt: str, **kw) -> str:
    return engine.generate([prompt], SamplingParams(**kw))[0].text


def test_same_api_as_one_server(routed, client):
    server, engine = routed
    r = client.completions.create(model="tiny", prompt="hello there", max_tokens=12, temperature=0)
    assert r.choices[0].text == expected(engine, "hello there", max_tokens=12, temperature=0)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (11, 12)
    chunks = list(client.completions.create(model="tiny", prompt=["ab", "cde"], max_tokens=20, temperature=0.9,
                                            seed=4, stream=True, stream_options={"include_usage": True}))
    for i, p in enumerate(["ab", "cde"]):
        got = "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i)
        assert got == expected(engine, p, max_tokens=20, temperature=0.9, seed=4)
    assert len({c.id for c in chunks}) == 1
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (5, 40)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="tiny", prompt="x", max_tokens=0)
    assert exc.value.body["param"] == "max_tokens"
    bad = httpx.post(f"{server.url}/v1/completions", headers=AUTH, content=b"{not json")
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    h = health(server.url)
    assert h["status"] == "ok" and [r["state"] for r in h["replicas"]] == ["ready", "ready"]
    text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    assert "plait_router_target_replicas 2.0" in text
    assert 'plait_generation_tokens_total{replica="' in text  # the replicas' own metrics, labelled


def test_requests_go_to_the_least_busy_replica(routed):
    server, _ = routed

    def served() -> list[int]:
        return [r["served"] for r in sorted(health(server.url)["replicas"], key=lambda r: r["id"])]

    body = {"model": "tiny", "prompt": "spread", "max_tokens": 4, "temperature": 0}
    for _ in range(6):  # one at a time: to the one that served fewer, so the counts even out
        assert httpx.post(f"{server.url}/v1/completions", headers=AUTH, json=body, timeout=60).status_code == 200
    before = served()
    assert max(before) - min(before) <= 1
    long = {**body, "max_tokens": 100}
    with ThreadPoolExecutor(6) as pool:  # at once (all arrive before any ends): three each
        list(pool.map(lambda _: httpx.post(f"{server.url}/v1/completions", headers=AUTH, json=long, timeout=60),
                      range(6)))
    assert [a - b for a, b in zip(served(), before)] == [3, 3]


def test_a_client_that_leaves_frees_its_slot(routed):
    server, _ = routed
    body = {"model": "tiny", "prompt": "leave", "max_tokens": 110, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", headers=AUTH, json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
        if health(server.url)["ongoing_requests"] == 0 and 'finish_reason="abort"' in text:
            return
        time.sleep(0.05)
    pytest.fail("the stream was not cancelled at its replica")


def _engine_of(pid: int) -> int:
    """The engine process of the replica server `pid` (its one child)."""
    from pathlib import Path

    kids = [int(k) for task in Path(f"/proc/{pid}/task").iterdir() for k in (task / "children").read_text().split()]
    assert len(kids) == 1, kids
    return kids[0]


@pytest.mark.parametrize("victim_kind", ["replica", "engine"])
def test_no_request_lost_when_a_replica_is_killed(routed, client, victim_kind):
    """12 clients at once (2 replicas × 4 slots: some queue inside replicas), streams and whole
    completions, greedy and seeded; SIGKILL to the busier replica (its server process, or only its
    engine process, as an out-of-memory kill would pick) while streams are mid-way."""
    server, engine = routed
    jobs = [(f"job {i}", dict(max_tokens=100, temperature=0.0 if i % 3 == 0 else 0.8, seed=i, top_k=60),
             i % 4 != 3) for i in range(12)]
    want = [expected(engine, p, **kw) for p, kw, _ in jobs]
    chunks_seen = [0] * len(jobs)
    before = health(server.url)
    old_pids = {r["pid"] for r in before["replicas"]}

    def run(i: int) -> str:
        prompt, kw, stream = jobs[i]
        kw = {k: v for k, v in kw.items() if k != "top_k"} | {"extra_body": {"top_k": kw["top_k"]}}
        if not stream:
            return client.completions.create(model="tiny", prompt=prompt, **kw).choices[0].text
        text = []
        for c in client.completions.create(model="tiny", prompt=prompt, stream=True, **kw):
            text.append(c.choices[0].text)
            chunks_seen[i] += 1
        return "".join(text)

    killed: list[int] = []

    def killer() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if sum(5 <= chunks_seen[i] < 60 for i in range(len(jobs))) >= 3:
                break
            time.sleep(0.005)
        victim = max(health(server.url)["replicas"], key=lambda r: r["ongoing"])
        until = time.monotonic() + 2
        while victim["ongoing"] == 0 and time.monotonic() < until:  # a count read between requests
            time.sleep(0.01)
            victim = max(health(server.url)["replicas"], key=lambda r: r["ongoing"])
        os.kill(victim["pid"] if victim_kind == "replica" else _engine_of(victim["pid"]), signal.SIGKILL)
        killed.append(victim["ongoing"])

    k = threading.Thread(target=killer)
    k.start()
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(run, range(len(jobs))))
    k.join()
    assert killed and killed[0] > 0  # the killed replica had work in flight
    assert got == want
    # The router replaced the dead replica.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        h = health(server.url)
        pids = {r["pid"] for r in h["replicas"] if r["state"] == "ready"}
        if len(pids) == 2 and pids - old_pids:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"no replacement replica: {h}")
    text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    metrics = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
               if line.startswith("plait_router_") and " " in line}
    assert metrics["plait_router_replica_failures_total"] >= 1 and metrics["plait_router_retries_total"] >= 1
    assert metrics["plait_router_failover_seconds_count"] >= 1
