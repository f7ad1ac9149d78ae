"""Uneven hardware on real runs: a speed-proportional dp split trains exactly like the even split,
and pipeline stages are cut by stage speed (dp=2 and pp=2 on the Gloo pool)."""

from __future__ import annotations

import pytest

from tests.helpers import max_abs_diff, tiny_run_config
from tests.profile.support import train_run


def _dp(pools, tmp_path, name: str, profile: dict, **parallel) -> list[dict]:
    cfg = tiny_run_config(tmp_path, train={"steps": 5, "micro_batch_size": 4, "grad_accum": 2,
                                           "out_dir": str(tmp_path / name)},
                          parallel={"dp": 2, "bucket_mb": 0.01, **parallel}, profile=profile)
    return pools(2).run(train_run, cfg.to_dict())


@pytest.fixture(scope="module")
def even(pools, tmp_path_factory):
    return _dp(pools, tmp_path_factory.mktemp("even"), "even", {"balance": "even"})


@pytest.mark.parametrize("reducer", ["bucketed", "naive"])
def test_given_speeds_split_unevenly_and_train_like_the_even_split(pools, tmp_path, even, reducer):
    runs = _dp(pools, tmp_path, "uneven", {"balance": "speed", "speeds": [1.0, 0.5]}, reducer=reducer)
    assert [r["split"] for r in runs] == [[5, 3], [5, 3]]  # of each draw of 2 × 4 sequences
    for r, e in zip(runs, even):
        assert max_abs_diff(r["params"], e["params"]) <= 1e-5
        assert [h["loss"] for h in r["history"]] == pytest.approx([h["loss"] for h in e["history"]], abs=1e-5)
    assert runs[0]["history"][0]["dp_split"] == [5, 3]


def test_measured_speeds_resplit_mid_run_and_change_nothing_but_time(pools, tmp_path, even):
    runs = _dp(pools, tmp_path, "measured", {"balance": "speed", "balance_steps": 2, "slow_rank": 1,
                                             "slow_factor": 3.0})
    split = runs[0]["split"]
    assert split[0] > split[1] and sum(split) == 8  # the slow rank gets fewer sequences
    assert "dp_split" in runs[0]["history"][1]      # decided after the 2 measured steps
    for r, e in zip(runs, even):
        assert max_abs_diff(r["params"], e["params"]) <= 1e-5


def _pp(pools, tmp_path, name: str, profile: dict) -> list[dict]:
    cfg = tiny_run_config(tmp_path, model={"n_layer": 4},
                          train={"steps": 3, "grad_accum": 2, "out_dir": str(tmp_path / name)},
                          parallel={"pp": 2, "schedule": "1f1b", "partition": "flops"}, profile=profile)
    return pools(2).run(train_run, cfg.to_dict())


def test_pipeline_stages_are_cut_by_speed(pools, tmp_path):
    even = _pp(pools, tmp_path, "even", {})
    given = _pp(pools, tmp_path, "given", {"balance": "speed", "speeds": [1.0, 0.5]})
    measured = _pp(pools, tmp_path, "measured", {"balance": "speed", "slow_rank": 1, "slow_factor": 3.0})
    layers = lambda run: [b - a for a, b in run[0]["bounds"]]  # noqa: E731
    assert layers(even) == [3, 3]      # embedding + 2 blocks | 2 blocks + head
    assert layers(given) == [4, 2]     # the stage twice as fast holds twice the work
    assert layers(measured)[0] > layers(measured)[1]
    # Where the layers live does not change the training (pipeline parity).
    merged = lambda run: {**run[0]["params"], **run[1]["params"]}  # noqa: E731
    assert max_abs_diff(merged(given), merged(even)) <= 1e-5
