"""A request resumed after tokens another run already sent continues exactly as that run did."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from plait.errors import RequestError
from plait.models import GPT
from plait.serve import Engine, EngineConfig, SamplingParams
from plait.serve.api import create_app
from plait.serve.async_engine import AsyncEngine
from plait.serve.text import TextStream
from tests.serve.support import tiny_gpt_config


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    return Engine(GPT(tiny_gpt_config()), config=EngineConfig(max_seqs=4, prefill_chunk=16), name="tiny")


def run_all(engine: Engine, requests: list[tuple[str, SamplingParams, list[int]]]) -> list[tuple[list[int], str]]:
    """Run requests side by side (resumed ones among fresh ones); new tokens and text of each."""
    ids = [engine.add_request(p, sp, resume=r) for p, sp, r in requests]
    tokens = {i: [] for i in ids}
    text = {i: "" for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
            text[out.request_id] += out.text
    return [(tokens[i], text[i]) for i in ids]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_resume_continues_the_same_tokens(engine, temperature):
    params = SamplingParams(max_tokens=60, temperature=temperature, top_k=50, seed=7)
    whole = engine.generate(["resume me", "other"], params)
    full, text = whole[0].token_ids, whole[0].text
    # Resumed after 0, 1, 13 and 59 tokens, beside a fresh request and each other.
    cuts = [0, 1, 13, 59]
    outs = run_all(engine, [("resume me", params, full[:k]) for k in cuts] + [("other", params, [])])
    for k, (tokens, _) in zip(cuts, outs):
        assert tokens == full[k:]
    assert outs[-1][0] == whole[1].token_ids
    # Text: what a stream had sent after k tokens, then the resumed text, is the whole text
    # (a token may end inside a character: the replay leaves the decoder where the first run had it).
    for k, (_, rest) in zip(cuts, outs):
        stream = TextStream(engine.tokenizer.decoder())
        sent = "".join(stream.push(t)[0] for t in full[:k])
        assert sent + rest == text


def test_resume_counts_the_replayed_tokens(engine):
    params = SamplingParams(max_tokens=10, temperature=0)
    full = engine.generate(["count"], params)[0].token_ids
    engine.add_request("count", params, request_id="r", resume=full[:4])
    last = None
    while engine.has_unfinished():
        for out in engine.step():
            last = out
    assert (last.prompt_tokens, last.completion_tokens, last.finish_reason) == (5, 10, "length")


def test_bad_resume_is_refused(engine):
    params = SamplingParams(max_tokens=3, temperature=0)
    with pytest.raises(RequestError, match="fewer than max_tokens"):
        engine.add_request("x", params, resume=[1, 2, 3])
    with pytest.raises(RequestError, match="integers in"):
        engine.add_request("x", params, resume=[256])
    assert not engine.has_unfinished()


def test_api_extension_streams_token_ids_and_resumes(engine):
    """Over HTTP (the app in-process through httpx's ASGI transport): `plait.token_ids` adds the
    ids to every event, `plait.resume` continues after them, and bad resumes are 400s."""
    app = create_app(AsyncEngine(engine), "tiny")
    body = {"model": "tiny", "prompt": ["one", "two"], "max_tokens": 30, "temperature": 0.8, "seed": 3,
            "stream": True}

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://router") as c:
                events = await stream(c, {**body, "plait": {"token_ids": True}})
                ids = {0: [], 1: []}
                for e in events:
                    for ch in e["choices"]:
                        ids[ch["index"]] += ch["plait"]["token_ids"]
                        assert ch["plait"]["prompt_tokens"] == 3
                assert len(ids[0]) == len(ids[1]) == 30
                rest = await stream(c, {**body, "plait": {"token_ids": True, "resume": [ids[0][:12], ids[1][:5]]}})
                again = {0: [], 1: []}
                for e in rest:
                    for ch in e["choices"]:
                        again[ch["index"]] += ch["plait"]["token_ids"]
                assert again == {0: ids[0][12:], 1: ids[1][5:]}
                bad = await c.post("/v1/completions", json={**body, "stream": False, "plait": {"resume": [[1]]}})
                assert bad.status_code == 400 and bad.json()["error"]["param"] == "plait"
                bad = await c.post("/v1/completions", json={**body, "plait": {"resume": [[1] * 30, []]}})
                assert bad.status_code == 400 and "fewer than max_tokens" in bad.json()["error"]["message"]

    async def stream(c, payload):
        import json
        async with c.stream("POST", "/v1/completions", json=payload) as r:
            assert r.status_code == 200
            lines = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        return [json.loads(x) for x in lines[:-1]]

    asyncio.run(main())
