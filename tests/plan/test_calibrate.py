"""CPU calibration: measured once per CPU, thread count and torch version, then read back."""

from __future__ import annotations

import math

import pytest

from plait.plan import calibrate
from plait.plan.cost import Candidate, estimate
from plait.plan.hardware import cpu_cluster
from plait.plan.shapes import ModelShape


def test_calibration_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PLAIT_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(calibrate, "_compute_rates", lambda: calls.append("rates") or {"gemm": 1e10})
    monkeypatch.setattr(calibrate, "_memory_and_dispatch", lambda: (1e10, 1e-6))
    monkeypatch.setattr(calibrate, "_gloo_alpha_beta", lambda threads: {"gloo": {"all_reduce": (1e-5, 1e9)},
                                                                        "gloo_sync": 1e-4})
    first = calibrate.calibrate_cpu(threads=1)
    assert calibrate.calibrate_cpu(threads=1) == first and calls == ["rates"]
    calibrate.calibrate_cpu(threads=2)
    calibrate.calibrate_cpu(threads=1, refresh=True)
    assert calls == ["rates"] * 3
    assert first["matmul_flops"] == 1e10 and first["gloo"] == {"all_reduce": [1e-5, 1e9]}
    assert first["gloo_sync"] == 1e-4


def test_microbenchmarks_measure_something():
    rates = calibrate._compute_rates(repeats=3)
    assert set(rates) >= {"gemm", "attn_fwd", "attn_bwd", "gelu", "gelu_bwd", "norm", "norm_bwd", "xent",
                          "xent_bwd", "adamw_param", "adamw_tensor"}
    assert all(math.isfinite(v) and v > 0 for v in rates.values())
    bw, per_op = calibrate._memory_and_dispatch(repeats=3)
    assert bw > 1e7 and 0 < per_op < 0.1  # loose: a shared machine may stall any one repeat


@pytest.fixture(scope="module")
def gloo():
    """One real Gloo calibration (two spawned processes, each forking a second), few calls."""
    saved = calibrate.SYNC_RUNS, calibrate.SYNC_CALLS
    calibrate.SYNC_RUNS, calibrate.SYNC_CALLS = 2, 6
    try:
        return calibrate._gloo_alpha_beta(threads=1)
    finally:
        calibrate.SYNC_RUNS, calibrate.SYNC_CALLS = saved


def test_gloo_calibration_measures_idle_and_under_compute_costs(gloo):
    assert set(gloo["gloo"]) == set(calibrate.GLOO_KINDS)
    for alpha, beta in gloo["gloo"].values():
        assert 0 < alpha < 0.1 and 1e6 < beta < 1e13  # a microsecond to 100 ms; a MB/s to 10 TB/s
    assert 0.0 <= gloo["gloo_sync"] < 0.1 and 0.0 <= gloo["gloo_sync_oversubscribed"] < 0.1  # waits, not seconds
    assert 1.0 <= gloo["oversubscribed_compute"] < 3.0  # two to a core: no faster than sharing, not far slower


def _calibration(sync: float, sync_over: float, slowdown: float) -> dict:
    kinds = calibrate.GLOO_KINDS
    return {"cpu": "test", "cores": 2, "threads": 1, "matmul_flops": 5e10, "mem_bw": 2e10, "mem_bytes": 8e9,
            "op_overhead_s": 1e-5,
            "rates": {"gemm": 5e10, "attn_fwd": 2e10, "attn_bwd": 2e10, "gelu": 3e8, "gelu_bwd": 2e8,
                      "norm": 1e9, "norm_bwd": 6e8, "xent": 1e9, "xent_bwd": 6e8, "adamw_tensor": 3e4,
                      "adamw_param": 3e8},
            "gloo": {k: (1e-4, 2e9) for k in kinds}, "gloo_sync": sync, "gloo_sync_oversubscribed": sync_over,
            "oversubscribed_compute": slowdown}


SHAPE = ModelShape("t", 2, 4, 128, 64, 256)


def test_sync_cost_is_paid_per_ring_step_of_each_collective():
    base, synced = _calibration(0.0, 0.0, 1.0), _calibration(1e-3, 0.0, 1.0)
    for cand in (Candidate(1, 1, 2), Candidate(2, 1, 1, zero=3), Candidate(1, 2, 1)):
        t0 = estimate(SHAPE, cpu_cluster(base, 2), cand, 8)
        t1 = estimate(SHAPE, cpu_cluster(synced, 2), cand, 8)
        assert t1.step_s > t0.step_s  # every layout with collectives pays
    one = estimate(SHAPE, cpu_cluster(synced, 1), Candidate(1), 8)
    assert one.step_s == estimate(SHAPE, cpu_cluster(base, 1), Candidate(1), 8).step_s  # no collectives
    # tp2: 2 all-reduces per block forward, 2 backward (2 ring steps each), and the vocabulary-parallel
    # head's; the sync cost is the difference, which is a whole number of 1 ms ring steps.
    tp = [estimate(SHAPE, cpu_cluster(c, 2), Candidate(1, 1, 2), 8) for c in (base, synced)]
    steps = (tp[1].step_s - tp[0].step_s) / 1e-3
    assert steps >= 2 * 4 * SHAPE.n_layer and abs(steps - round(steps)) < 1e-6


def test_oversubscribed_processes_use_the_two_per_core_measurements():
    cal = _calibration(1e-4, 2e-3, 1.2)
    two, four = cpu_cluster(cal, 2), cpu_cluster(cal, 4)
    assert two.shared_compute == 1.0 and two.sync == two.shared_sync == 1e-4
    assert four.shared_compute == pytest.approx(1.2) and (four.sync, four.shared_sync) == (0.0, 2e-3)
    assert cpu_cluster(cal, 3).shared_compute == pytest.approx(1.1)  # halfway to two per core
    # Waits hold no core: the shared bound adds one rank's waits (dp4's one gradient bucket: a
    # ring all-reduce of 2·3 steps), not every process's, and the rank's own path pays none.
    plain = estimate(SHAPE, cpu_cluster(_calibration(0, 0, 1.0), 4), Candidate(4), 16)
    slow = estimate(SHAPE, cpu_cluster(_calibration(0, 0, 1.2), 4), Candidate(4), 16)
    waits = estimate(SHAPE, cpu_cluster(_calibration(0, 2e-3, 1.0), 4), Candidate(4), 16)
    assert slow.step_s == pytest.approx(1.2 * plain.step_s, rel=0.01)
    assert waits.breakdown["dp comm"] == plain.breakdown["dp comm"]
    assert waits.step_s - plain.step_s == pytest.approx(6 * 2e-3)
