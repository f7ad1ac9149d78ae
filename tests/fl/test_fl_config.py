"""The [fl] section: each bad field named in its error; the clients' learning-rate decay."""

from __future__ import annotations

import pytest

from plait.errors import ConfigError
from tests.fl.support import digits_config


@pytest.mark.parametrize("field, value, message", [
    ("lr_decay", 0.0, r"fl.lr_decay=0.0 must be in \(0, 1\]"),
    ("lr_decay", 1.5, r"fl.lr_decay=1.5 must be in \(0, 1\]"),
    ("lr", 0.0, r"fl.lr=0.0 must be > 0"),
    ("rounds", 0, r"fl.rounds=0 must be ≥ 1"),
    ("trim_beta", 0.5, r"fl.trim_beta=0.5 must be in \(0, 0.5\)"),
    ("min_clients", 11, r"fl.min_clients=11 must be in \[1, 10\]"),
    ("topk_values", "int8", r"fl.topk_values"),
])
def test_a_bad_fl_field_is_named(field, value, message):
    with pytest.raises(ConfigError, match=message):
        digits_config(**{field: value})


def test_client_lr_decays_per_server_round():
    from plait.fl.local import LocalWork

    cfg = digits_config(lr=0.2, lr_decay=0.5)
    assert [LocalWork.from_config(cfg, server_round=r).lr for r in (1, 2, 3)] == [0.2, 0.1, 0.05]
    assert LocalWork.from_config(digits_config(lr=0.2), server_round=7).lr == 0.2  # 1.0: constant


def test_decayed_lr_changes_training_from_the_second_round_on():
    from plait.fl.runner import run_local

    plain = run_local(digits_config(rounds=2))
    decayed = run_local(digits_config(rounds=2, lr_decay=0.5))
    assert plain.history[1]["accuracy"] == decayed.history[1]["accuracy"]  # round 1: same lr
    assert plain.history[-1]["loss"] != decayed.history[-1]["loss"]
