"""Differential privacy (ε against Opacus's accountant), SecAgg+ with dropouts, the attack harness."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from plait.fl.attacks import malicious_clients, poison
from plait.fl.client import ClientWorker, round_seed
from plait.fl.local import LocalWork, train_locally
from plait.fl.privacy import DEFAULT_ORDERS, RDPAccountant, local_noise_multiplier
from plait.fl.records import model_arrays, numpy_arrays
from plait.fl.runner import run_local
from plait.fl.task import build_model
from tests.fl.support import digits_config


@pytest.mark.parametrize("z, q, steps", [(1.1, 0.25, 30), (0.8, 0.05, 200), (2.0, 1.0, 10)])
def test_epsilon_matches_opacus_accountant(z, q, steps):
    opacus = pytest.importorskip("opacus.accountants")
    ours = RDPAccountant()
    ours.step(z, q, steps)
    theirs = opacus.RDPAccountant()
    theirs.history = [(z, q, steps)]
    assert ours.epsilon(1e-5) == pytest.approx(theirs.get_epsilon(1e-5, alphas=list(DEFAULT_ORDERS)), rel=1e-9)
    # Opacus's default orders add fractional ones, which can only tighten the bound a little.
    assert theirs.get_epsilon(1e-5) <= ours.epsilon(1e-5) <= 1.02 * theirs.get_epsilon(1e-5)


def test_central_dp_reports_the_epsilon_spent_each_round():
    cfg = digits_config(dp="central", dp_noise_multiplier=1.0, dp_clip=0.5, clients_per_round=5, rounds=3)
    result = run_local(cfg)
    eps = [row["epsilon"] for row in result.history[1:]]
    assert eps == sorted(eps) and eps[0] > 0
    expected = RDPAccountant()
    expected.step(1.0, 5 / 10, 3)
    assert eps[-1] == pytest.approx(expected.epsilon(1e-5))


def test_local_dp_reports_each_clients_releases():
    cfg = digits_config(dp="local", dp_epsilon=2.0, dp_clip=1.0, rounds=2)
    result = run_local(cfg)
    expected = RDPAccountant()
    expected.step(local_noise_multiplier(2.0, 1e-5), 1.0, 2)
    assert result.history[-1]["epsilon"] == pytest.approx(expected.epsilon(1e-5))


def _local_result(cfg, pid, initial):
    worker = ClientWorker(cfg)
    worker.model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in initial.items()})
    data = worker.dataset(pid)
    train_locally(worker.model, data, LocalWork.from_config(cfg), cfg, seed=round_seed(cfg.fl.seed, 1, pid))
    return {k: v.detach().numpy().copy() for k, v in worker.model.state_dict().items()}, len(data)


def test_secagg_plus_aggregate_equals_the_plain_average_with_a_fifth_dropping_out():
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    cfg = digits_config(clients=5, rounds=1, secure_aggregation=True)
    dropped = 2

    def drop(msg, pid):  # client 2 shares its keys, then vanishes before sending its masked update
        stage = msg.content.config_records.get(RECORD_KEY_CONFIGS, {}).get(Key.STAGE)
        return pid == dropped and stage == Stage.COLLECT_MASKED_VECTORS

    result = run_local(cfg, drop=drop)
    assert result.dropped == 1
    initial = numpy_arrays(model_arrays(build_model(cfg)))
    locals_ = [_local_result(cfg, pid, initial) for pid in range(5) if pid != dropped]
    total = sum(n for _, n in locals_)
    for k in initial:
        plain = sum(w[k] * n for w, n in locals_) / total
        assert np.abs(result.final[k] - plain).max() <= 1e-4
        assert not np.allclose(result.final[k], initial[k])  # the clients' training arrived


def test_malicious_clients_are_fixed_by_the_seed():
    a = malicious_clients(20, 0.2, seed=0)
    assert len(a) == 4 and a == malicious_clients(20, 0.2, seed=0) and all(0 <= i < 20 for i in a)


def test_poisoned_updates():
    sent, local = {"w": np.zeros(3, np.float32)}, {"w": np.array([1, -2, 3], np.float32)}
    np.testing.assert_array_equal(poison(local, sent, "sign_flip", 4.0)["w"], [-4, 8, -12])
    np.testing.assert_array_equal(poison(local, sent, "scale", 4.0)["w"], [4, -8, 12])
    assert np.isnan(poison(local, sent, "nan", 1.0)["w"]).all()
    assert np.isinf(poison(local, sent, "inf", 1.0)["w"]).all()


def test_sign_flipping_breaks_fedavg_and_a_robust_strategy_holds():
    common = dict(clients=10, partition="iid", rounds=4, local_epochs=2)
    clean = run_local(digits_config(**common))
    attacked = run_local(digits_config(attack="sign_flip", malicious_share=0.2, **common))
    robust = run_local(digits_config(attack="sign_flip", malicious_share=0.2, strategy="fedmedian", **common))
    assert attacked.last("accuracy") < 0.5 * clean.last("accuracy")
    assert robust.last("accuracy") > 0.8 * clean.last("accuracy")


def test_nan_attackers_are_refused_every_round():
    result = run_local(digits_config(attack="nan", malicious_share=0.2, rounds=2))
    assert all(row["refused"] == 2 and "NaN/Inf" in row["refused_reasons"][0] for row in result.history[1:])
