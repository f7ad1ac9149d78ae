"""`plait serve` on loopback, driven by the real `openai` client and raw HTTP."""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from plait.serve import Engine, EngineConfig, SamplingParams
from tests.serve.support import API_KEY, ServerProcess, write_run

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    run, model = write_run(tmp_path_factory.mktemp("serve") / "tiny")
    server = ServerProcess(run, "--api-key", API_KEY, "--max-seqs", "8", "--prefill-chunk", "16")
    yield server, Engine(model, config=EngineConfig(max_seqs=8, prefill_chunk=16))
    server.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[0].url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def expected(engine: Engine, prompt: str, **kw) -> str:
    return engine.generate([prompt], SamplingParams(**kw))[0].text


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", headers=AUTH).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_completion(served, client):
    _, engine = served
    r = client.completions.create(model="tiny", prompt="hello there", max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == "tiny" and len(r.choices) == 1
    assert r.choices[0].text == expected(engine, "hello there", max_tokens=12, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (11, 12, 23)


def test_streamed_completion(served, client):
    _, engine = served
    stream = client.completions.create(model="tiny", prompt="stream me", max_tokens=100, temperature=0.9,
                                       seed=5, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 10 and all(c.usage is None for c in chunks[:-1])
    assert "".join(texts) == expected(engine, "stream me", max_tokens=100, temperature=0.9, seed=5)
    assert chunks[-2].choices[0].finish_reason == "length"
    last = chunks[-1]
    assert last.choices == [] and (last.usage.prompt_tokens, last.usage.completion_tokens) == (9, 100)


def test_raw_event_stream_ends_with_done(served):
    server, _ = served
    with httpx.stream("POST", f"{server.url}/v1/completions", headers=AUTH, timeout=60,
                      json={"model": "tiny", "prompt": "sse", "max_tokens": 3, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(e[6:]) for e in events[:-1])


def test_api_key_is_required(served):
    server, _ = served
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt="x", max_tokens=1)
    for path in ("/v1/models", "/health", "/metrics"):
        r = httpx.get(f"{server.url}{path}")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(f"{server.url}/v1/completions", headers={"Authorization": "Bearer wrong"}, json={})
    assert r.status_code == 401


def test_models_health_and_metrics(served, client):
    server, _ = served
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(f"{server.url}/health", headers=AUTH).json()["status"] == "ok"
    text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    for name in ("plait_queue_depth", "plait_running_sequences", "plait_generation_tokens_per_second",
                 "plait_time_to_first_token_seconds_bucket", "plait_time_per_output_token_seconds_bucket",
                 "plait_generation_tokens_total"):
        assert name in text
    assert metric(server.url, "plait_time_to_first_token_seconds_count") >= 1


def test_list_prompt_gives_one_choice_each(served, client):
    _, engine = served
    r = client.completions.create(model="tiny", prompt=["ab", "cde"], max_tokens=4, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [expected(engine, p, max_tokens=4, temperature=0) for p in ("ab", "cde")]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (5, 8)


BAD = [  # (body, status, param)
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"model": "tiny", "prompt": 5}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "max_tokens": "3"}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": "x"}, 400, "model"),
    ({"model": "other", "prompt": "x"}, 404, "model"),
    ({"model": "tiny", "prompt": ""}, 400, "prompt"),
    ({"model": "tiny", "prompt": []}, 400, "prompt"),
    ({"model": "tiny", "prompt": [1, 999]}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x" * 120, "max_tokens": 20}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "temperature": -0.1}, 400, "temperature"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "prompt": "x", "top_p": 1.01}, 400, "top_p"),
    ({"model": "tiny", "prompt": "x", "n": 2}, 400, "n"),
    ({"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
]


def post(url: str, body) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}/v1/completions", content=content, timeout=60,
                      headers={**AUTH, "Content-Type": "application/json"})


@pytest.mark.parametrize("body,status,param", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_request_is_refused_by_field(served, body, status, param):
    server, _ = served
    r = post(server.url, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_unknown_route_is_an_openai_error(served):
    r = httpx.get(f"{served[0].url}/v1/nothing", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["message"]


def test_bad_and_good_interleaved_under_concurrency(served, client):
    """32 good requests (greedy and seeded sampling, some streamed) among 19 bad ones, 8 at a
    time: every bad one is refused, every good one gets exactly its one-at-a-time tokens."""
    server, engine = served
    rng = random.Random(3)
    good = []
    for i in range(32):
        kw = dict(max_tokens=rng.randint(1, 30), temperature=0.0 if i % 2 else rng.choice([0.7, 1.2]),
                  top_p=rng.choice([1.0, 0.9]), seed=i)
        good.append(("".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 60))), kw, i % 3 == 0))
    jobs = [("good", g) for g in good] + [("bad", b) for b in BAD]
    rng.shuffle(jobs)

    def run(job):
        kind, item = job
        if kind == "bad":
            return kind, item, post(server.url, item[0]).status_code
        prompt, kw, stream = item
        if stream:
            chunks = client.completions.create(model="tiny", prompt=prompt, stream=True, **kw)
            return kind, item, "".join(c.choices[0].text for c in chunks if c.choices)
        return kind, item, client.completions.create(model="tiny", prompt=prompt, **kw).choices[0].text

    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, jobs))
    assert time.monotonic() - t0 < 120
    for kind, item, got in results:
        if kind == "bad":
            assert got == item[1]
        else:
            prompt, kw, _ = item
            assert got == expected(engine, prompt, **kw), (prompt, kw)
    assert httpx.get(f"{server.url}/health", headers=AUTH).status_code == 200
