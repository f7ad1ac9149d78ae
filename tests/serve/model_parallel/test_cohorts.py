"""pp=2 pipelined across decode steps (two cohorts, one step of each in flight): every request gets
the one-process engine's tokens, greedy and seeded, while requests finish, join mid-run and are
aborted with their step in flight; on a real Gloo group of two processes."""

from __future__ import annotations

import pytest

from plait.errors import ConfigError
from plait.serve import Engine, EngineConfig, SamplingParams
from plait.serve.model_parallel import open_engine
from plait.serve.model_parallel.cohorts import CohortEngine
from tests.serve.model_parallel.test_parity import PROMPTS, varied_run


def config() -> EngineConfig:
    # Six slots, three per cohort, for twelve requests: both cohorts fill, requests queue, finish at
    # different steps and their slots move across cohorts.
    return EngineConfig(max_seqs=6, prefill_chunk=16)


def params(i: int) -> SamplingParams:
    n = [9, 4, 14, 6, 11, 2, 8, 13, 5, 10, 7, 12][i]
    if i % 3 == 2:
        return SamplingParams(max_tokens=n, temperature=0.9, top_k=30, seed=100 + i)
    return SamplingParams(max_tokens=n, temperature=0)


PROMPTS12 = PROMPTS + ["more requests than slots", "0" * 20]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return varied_run(tmp_path_factory.mktemp("cohorts") / "run")


@pytest.mark.parametrize("kw, match", [
    (dict(tp=2, cohorts=2), "cohorts=2 needs a pipeline"),
    (dict(pp=2, cohorts=-1), "cohorts=-1 must be an integer ≥ 0"),
])
def test_bad_cohorts_are_refused_before_any_process_starts(run_dir, kw, match):
    # First in this module: before the engine fixture opens a process group here.
    with pytest.raises(ConfigError, match=match):
        open_engine(run_dir, config(), threads=1, **kw)


@pytest.fixture(scope="module")
def engine(run_dir):
    engine = open_engine(run_dir, config(), pp=2, threads=1)
    yield engine
    engine.close()


def test_cross_step_pipeline_gives_one_process_tokens(engine, run_dir):
    assert isinstance(engine, CohortEngine) and engine.cohorts == 2 and engine.runner.micro_batches == 1
    want = [c.token_ids for c in Engine.from_path(run_dir, config()).generate(
        PROMPTS12, [params(i) for i in range(12)])]
    got: dict[str, list[int]] = {}
    rid = {}
    for i in range(8):
        rid[i] = engine.add_request(PROMPTS12[i], params(i))

    def step() -> None:
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.token_ids)

    # A step still in flight after a call means two were in flight while the older one finished.
    overlapped = 0
    for _ in range(6):
        step()
        overlapped += len(engine._inflight)
    for i in range(8, 12):  # join mid-run
        rid[i] = engine.add_request(PROMPTS12[i], params(i))
    for _ in range(3):
        step()
    # Abort a request whose step is in flight, and one still queued.
    flying = [s.request_id for f in engine._inflight for s in f.plan.decode + [p[0] for p in f.plan.prefill]]
    in_flight = next(i for i in range(12) if rid[i] in flying)
    queued = next(i for i in range(12) if i != in_flight and engine._seqs.get(rid[i]) in engine.scheduler.waiting)
    assert engine.abort(rid[in_flight]) and engine.abort(rid[queued])
    while engine.has_unfinished():
        step()
        overlapped += len(engine._inflight)
    assert overlapped >= 10
    assert engine.cache.num_free == config().max_seqs and not engine._inflight
    for i in range(12):
        if i in (in_flight, queued):
            assert want[i][:len(got.get(rid[i], []))] == got.get(rid[i], [])
            assert len(got.get(rid[i], [])) < len(want[i])
        else:
            assert got[rid[i]] == want[i], i
    assert len({t for w in want for t in w}) > 20  # varied tokens: the comparison says something


def test_one_cohort_and_cohort_changes(engine, run_dir):
    sp = [params(i) for i in range(6)]
    want = [c.token_ids for c in Engine.from_path(run_dir, config()).generate(PROMPTS12[:6], sp)]
    engine.cohorts = 1  # one step at a time: the naive layer split with one micro-batch
    try:
        assert [c.token_ids for c in engine.generate(PROMPTS12[:6], sp)] == want
        engine.add_request("busy", SamplingParams(max_tokens=3, temperature=0))
        engine.step()
        with pytest.raises(ConfigError, match="only while no request is running"):
            engine.cohorts = 2
        while engine.has_unfinished():
            engine.step()
    finally:
        engine.cohorts = 2
    with pytest.raises(ConfigError, match="cohorts=0"):
        engine.cohorts = 0

