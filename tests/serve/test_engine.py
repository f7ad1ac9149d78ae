"""The engine: continuous batching gives every request exactly what it gets alone."""

from __future__ import annotations

import random

import pytest
import torch

from plait.errors import ConfigError, RequestError, ServerBusyError
from plait.models import GPT
from plait.serve import Engine, EngineConfig, SamplingParams
from plait.serve.commands import generate_text
from tests.serve.support import tiny_gpt_config, write_run


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_gpt_config()).eval()


def mixed_requests(n: int = 32, seed: int = 0, longest: int = 40) -> list[tuple[str, SamplingParams]]:
    """Prompts of 1-100 bytes (some span several prefill chunks), 1-`longest` new tokens, every sampler."""
    rng = random.Random(seed)
    words = "the model serves many users at once with a cache of keys and values".split()
    out = []
    for i in range(n):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(1, 18)))[:rng.randint(1, 100)]
        kind = i % 4
        params = SamplingParams(
            max_tokens=rng.randint(1, longest),
            temperature=0.0 if kind == 0 else rng.choice([0.5, 0.8, 1.0, 1.5]),
            top_k=rng.choice([0, 5, 40]) if kind >= 2 else 0,
            top_p=rng.choice([0.5, 0.9, 1.0]) if kind == 3 else 1.0,
            stop=("e m",) if i % 7 == 0 else (),
            seed=1000 + i if kind else None)
        out.append((prompt, params))
    return out


def run_batched(engine: Engine, requests, waves: int = 4) -> tuple[dict[int, list[int]], dict]:
    """Add the requests in waves while the engine runs, so newcomers join a running batch."""
    ids, results = {}, {}
    stats = {"peak_running": 0, "mixed_steps": 0}
    per_wave = -(-len(requests) // waves)
    pending = list(enumerate(requests))
    while pending or engine.has_unfinished():
        if pending and (not engine.has_unfinished() or engine.num_running >= 2):
            for i, (prompt, params) in pending[:per_wave]:
                ids[engine.add_request(prompt, params)] = i
            pending = pending[per_wave:]
        plan_has_decode = any(not s.prefilling for s in engine.scheduler.running)
        outs = engine.step()
        stats["peak_running"] = max(stats["peak_running"], engine.num_running)
        if plan_has_decode and any(s.prefilling or s.computed == s.prompt_len and not s.output_ids[1:]
                                   for s in engine.scheduler.running):
            stats["mixed_steps"] += 1
        for out in outs:
            results.setdefault(ids[out.request_id], []).extend(out.token_ids)
    return results, stats


def test_batched_equals_one_at_a_time_and_plain_generate(model):
    """32 concurrent requests, mixed lengths and samplers: token-identical to running alone, and
    greedy ones token-identical to GPT.generate (the unbatched path)."""
    requests = mixed_requests()
    engine = Engine(model, config=EngineConfig(max_seqs=8, prefill_chunk=16))
    batched, stats = run_batched(engine, requests)
    assert stats["peak_running"] == 8 and stats["mixed_steps"] > 0  # really batched, really continuous
    alone_engine = Engine(model, config=EngineConfig(max_seqs=1, prefill_chunk=16))
    for i, (prompt, params) in enumerate(requests):
        alone = alone_engine.generate([prompt], params)[0]
        assert batched[i] == alone.token_ids, f"request {i} ({params}) differs when batched"
        if params.greedy and not params.stop:
            idx = torch.tensor([list(prompt.encode())])
            ref = model.generate(idx, params.max_tokens, temperature=0)[0, idx.shape[1]:].tolist()
            assert alone.token_ids == ref, f"request {i}: engine greedy differs from GPT.generate"


def test_all_slots_at_once_match_too(model):
    requests = mixed_requests(seed=1)
    together = Engine(model, config=EngineConfig(max_seqs=32, prefill_chunk=32)).generate(
        [p for p, _ in requests], [s for _, s in requests])
    small = Engine(model, config=EngineConfig(max_seqs=3, prefill_chunk=32))
    for (prompt, params), got in zip(requests, together):
        assert got.token_ids == small.generate([prompt], params)[0].token_ids


def test_completion_fields_and_stop(model):
    engine = Engine(model, config=EngineConfig(max_seqs=4))
    c = engine.generate("hello", SamplingParams(max_tokens=12, temperature=0))[0]
    assert c.finish_reason == "length" and c.completion_tokens == 12 == len(c.token_ids)
    assert c.prompt_tokens == 5 and c.text == bytes(c.token_ids).decode("utf-8", errors="replace")
    stop = c.text[3:5]
    s = engine.generate("hello", SamplingParams(max_tokens=12, temperature=0, stop=(stop,)))[0]
    assert s.finish_reason == "stop" and s.text == c.text[:c.text.index(stop)]


def test_prefill_is_chunked_and_never_stalls_decoding(model):
    """A 120-token prompt arriving while others decode is prefilled 16 tokens a step; the decoding
    sequences gain a token every one of those steps."""
    engine = Engine(model, config=EngineConfig(max_seqs=4, prefill_chunk=16, max_step_tokens=20))
    a = engine.add_request("a b c", SamplingParams(max_tokens=100, temperature=0))
    b = engine.add_request("d e f", SamplingParams(max_tokens=100, temperature=0))
    for _ in range(3):
        engine.step()
    long = engine.add_request("x" * 120, SamplingParams(max_tokens=2, temperature=0))
    steps_to_first = 0
    while True:
        outs = {o.request_id: o for o in engine.step()}
        steps_to_first += 1
        assert a in outs and b in outs  # decoders are never stalled
        if long in outs:
            break
    assert steps_to_first == -(-120 // 16)  # one chunk per step: 8 steps


def test_cancel_frees_the_slot(model):
    engine = Engine(model, config=EngineConfig(max_seqs=1, max_step_tokens=64, prefill_chunk=64))
    first = engine.add_request("abc", SamplingParams(max_tokens=100, temperature=0))
    second = engine.add_request("def", SamplingParams(max_tokens=3, temperature=0))
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 1
    assert engine.abort(first) and not engine.abort(first)
    assert engine.cache.num_free == 1
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert {o.request_id for o in outs} == {second} and outs[-1].finish_reason == "length"
    assert engine.abort(second) is False


def test_bad_requests_are_refused_by_field(model):
    engine = Engine(model, config=EngineConfig(max_seqs=2, max_queue=2))
    cases = [("", SamplingParams(), "prompt"), ("x" * 120, SamplingParams(max_tokens=9), "max_tokens"),
             ("x", SamplingParams(max_tokens=0), "max_tokens"), ("x", SamplingParams(temperature=-1), "temperature"),
             ("x", SamplingParams(top_p=0), "top_p"), ("x", SamplingParams(top_p=1.5), "top_p"),
             ("x", SamplingParams(top_k=-2), "top_k"), ([1, 300], SamplingParams(), "prompt"),
             ("x", SamplingParams(stop=("",)), "stop")]
    for prompt, params, field in cases:
        with pytest.raises(RequestError) as exc:
            engine.add_request(prompt, params)
        assert exc.value.param == field, (prompt, params, exc.value)
    engine.add_request("a")
    engine.add_request("b")
    with pytest.raises(ServerBusyError):
        engine.add_request("c")
    with pytest.raises(ConfigError, match="max_step_tokens"):
        Engine(model, config=EngineConfig(max_seqs=8, prefill_chunk=16, max_step_tokens=20))


def test_plait_generate_goes_through_the_engine(model, tmp_path):
    run, saved = write_run(tmp_path / "run")
    text = generate_text(run, "hello", 20, temperature=0.8, top_k=40, seed=3)
    engine = Engine(saved, config=EngineConfig(max_seqs=5))
    batch = engine.generate(["other", "hello", "more"], [SamplingParams(max_tokens=20, temperature=0.8, top_k=40,
                                                                        seed=s) for s in (1, 3, 2)])
    assert text == "hello" + batch[1].text
    # Beyond the context the window slides (no cache): still the prompt and 200 more tokens.
    long = generate_text(run, "hi", 130, temperature=0, top_k=0, seed=0)
    assert long.startswith("hi") and len(long) > 2


def test_parity_holds_on_two_threads(model):
    """The row quantum is probed per thread count: two threads split GEMMs differently."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        requests = mixed_requests(n=8, seed=2, longest=8)
        engine = Engine(model, config=EngineConfig(max_seqs=8, prefill_chunk=16))
        together = engine.generate([p for p, _ in requests], [s for _, s in requests])
        for (prompt, params), got in zip(requests, together):
            assert got.token_ids == engine.generate([prompt], params)[0].token_ids
    finally:
        torch.set_num_threads(before)


def test_attention_spans_give_the_bits_of_whole_slots(model):
    """Where the start-up check finds a span quantum, attending only as far as the batch reaches
    gives exactly what attending over whole cache slots gives."""
    from plait.serve.invariance import probe_span_quantum

    c = model.cfg
    quantum = probe_span_quantum(c.n_head, c.n_embd // c.n_head, c.block_size)
    if quantum == c.block_size:
        pytest.skip("no exact span quantum on this machine: the engine attends over whole slots")
    requests = mixed_requests(n=12, seed=4)
    prompts, params = [p for p, _ in requests], [s for _, s in requests]
    spans = Engine(model, config=EngineConfig(max_seqs=12, span_quantum=quantum)).generate(prompts, params)
    whole = Engine(model, config=EngineConfig(max_seqs=12, span_quantum=c.block_size)).generate(prompts, params)
    assert [a.token_ids for a in spans] == [b.token_ids for b in whole]
