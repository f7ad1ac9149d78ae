"""tp=2 × pp=2 in one replica (four processes): the same tokens as one process, and a clean close;
layouts that cannot work, refused before any process starts (no group is open in this module)."""

from __future__ import annotations

import multiprocessing

import pytest

from plait.errors import ConfigError, LaunchError
from plait.serve import Engine, SamplingParams
from plait.serve.model_parallel import open_engine
from tests.serve.model_parallel.test_parity import LENGTHS, PROMPTS, engine_config, varied_run


def test_tp2_by_pp2_matches_and_closes(tmp_path):
    run_dir = varied_run(tmp_path / "run")
    reference = Engine.from_path(run_dir, engine_config())
    children = set(multiprocessing.active_children())
    engine = open_engine(run_dir, engine_config(), tp=2, pp=2, threads=1)
    workers = [p for p in engine.runner.workers.procs]
    try:
        assert len(workers) == 3 and all(p.is_alive() for p in workers)
        params = [SamplingParams(max_tokens=n, temperature=0) for n in LENGTHS[:6]]
        want = [c.token_ids for c in reference.generate(PROMPTS[:6], params)]
        assert [c.token_ids for c in engine.generate(PROMPTS[:6], params)] == want
    finally:
        engine.close()
    assert not any(p.is_alive() for p in workers)
    assert set(multiprocessing.active_children()) <= children
    engine.close()  # a second close is a no-op
    with pytest.raises(LaunchError, match="closed"):
        engine.generate(["after close"], SamplingParams(max_tokens=2, temperature=0))


@pytest.mark.parametrize("kw, match", [
    (dict(tp=3), "--tp 3 does not divide model.n_head=4"),
    (dict(pp=5), "--pp 5 exceeds the model's 4 blocks"),
    (dict(tp=0), "--tp 0 must be an integer ≥ 1"),
    (dict(micro_batches=-1), "micro_batches=-1"),
])
def test_bad_layouts_are_refused_before_any_process_starts(tmp_path_factory, kw, match):
    run_dir = varied_run(tmp_path_factory.mktemp("bad") / "run")
    children = set(multiprocessing.active_children())
    with pytest.raises(ConfigError, match=match):
        open_engine(run_dir, engine_config(), threads=1, **kw)
    assert set(multiprocessing.active_children()) == children
