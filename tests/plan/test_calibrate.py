"""CPU calibration: measured once per CPU, thread count and torch version, then read back."""

from __future__ import annotations

import math

from plait.plan import calibrate


def test_calibration_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PLAIT_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(calibrate, "_compute_rates", lambda: calls.append("rates") or {"gemm": 1e10})
    monkeypatch.setattr(calibrate, "_memory_and_dispatch", lambda: (1e10, 1e-6))
    monkeypatch.setattr(calibrate, "_gloo_alpha_beta", lambda threads: {"all_reduce": (1e-5, 1e9)})
    first = calibrate.calibrate_cpu(threads=1)
    assert calibrate.calibrate_cpu(threads=1) == first and calls == ["rates"]
    calibrate.calibrate_cpu(threads=2)
    calibrate.calibrate_cpu(threads=1, refresh=True)
    assert calls == ["rates"] * 3
    assert first["matmul_flops"] == 1e10 and first["gloo"] == {"all_reduce": [1e-5, 1e9]}


def test_microbenchmarks_measure_something():
    rates = calibrate._compute_rates(repeats=3)
    assert set(rates) >= {"gemm", "attn_fwd", "attn_bwd", "gelu", "gelu_bwd", "norm", "norm_bwd", "xent",
                          "xent_bwd", "adamw_param", "adamw_tensor"}
    assert all(math.isfinite(v) and v > 0 for v in rates.values())
    bw, per_op = calibrate._memory_and_dispatch(repeats=3)
    assert bw > 1e7 and 0 < per_op < 0.1  # loose: a shared machine may stall any one repeat
