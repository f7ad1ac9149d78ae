"""The in-process runner: Flower's strategies over an in-memory grid, on the digits."""

from __future__ import annotations

import numpy as np
import pytest

from plait.fl.runner import run_local
from tests.fl.support import digits_config


def test_fedavg_learns_and_reports_every_round():
    cfg = digits_config(rounds=4, local_epochs=2)
    result = run_local(cfg)
    rounds = [row["round"] for row in result.history]
    assert rounds == [0, 1, 2, 3, 4]
    assert result.history[-1]["accuracy"] > result.history[0]["accuracy"] + 0.3
    assert all(row["accepted"] == 10 and row["refused"] == 0 for row in result.history[1:])
    assert result.history[1]["upload_wire_bytes"] > 10 * result.history[1]["upload_payload_bytes"] / 11
    assert sum(p["size"] for p in result.partitions) == 1438 and all(len(p["labels"]) == 2 for p in result.partitions)


def test_same_seed_same_result_other_seed_other_result():
    a, b = run_local(digits_config()), run_local(digits_config())
    c = run_local(digits_config(seed=1))
    assert all(np.array_equal(a.final[k], b.final[k]) for k in a.final)
    assert not all(np.array_equal(a.final[k], c.final[k]) for k in a.final)


@pytest.mark.parametrize("strategy, extra", [
    ("fedprox", {"proximal_mu": 0.1}), ("fedadam", {"server_lr": 0.01}), ("fedyogi", {"server_lr": 0.01}),
    ("fedmedian", {}), ("fedtrimmedavg", {}), ("krum", {"byzantine": 1}), ("multikrum", {"byzantine": 1}),
    ("bulyan", {"byzantine": 1}),
])
def test_every_flower_strategy_runs_unchanged(strategy, extra):
    result = run_local(digits_config(strategy=strategy, rounds=1, **extra))
    row = result.history[-1]
    assert row["aggregated"] and row["accepted"] == 10
    assert result.history[-1]["accuracy"] != result.history[0]["accuracy"]  # the model moved


def test_clients_that_drop_out_leave_the_round_to_the_others():
    cfg = digits_config(dropout=0.3, min_clients=3, rounds=3)
    result = run_local(cfg)
    assert result.dropped > 0
    rows = result.history[1:]
    assert sum(10 - row["replies"] for row in rows) == result.dropped
    assert all(row["aggregated"] for row in rows if row["accepted"] >= 3)


def test_below_the_minimum_clients_the_global_model_is_kept():
    cfg = digits_config(min_clients=10, rounds=1)
    drop_one = lambda msg, pid: pid == 4  # noqa: E731
    result = run_local(cfg, drop=drop_one)
    assert result.history[1]["accepted"] == 9 and not result.history[1]["aggregated"]
    assert result.history[1]["accuracy"] == result.history[0]["accuracy"]
