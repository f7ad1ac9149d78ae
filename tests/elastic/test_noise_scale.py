"""The gradient noise scale measured where data parallelism computes it (the reducer's hook and
the averaged gradient) against its analytic value, the adaptive batch rule, and the trainer's
metrics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from plait.config import Config
from plait.elastic.noise_scale import (
    BatchMonitor,
    NoiseScale,
    adascale_gain,
    noise_terms,
)
from plait.mesh import ParallelMesh
from plait.parallel.data_parallel.reducer import GradientReducer
from plait.train.metrics import read_metrics
from plait.train.run import load_splits
from plait.train.trainer import Trainer
from tests.helpers import tiny_run_config

D, SIGMA, B = 8, 0.5, 8


def test_noise_terms_recover_exact_expectations():
    g2, trace = 2.0, 30.0
    for b_small, b_big in ((4, 8), (3, 12)):
        small, big = g2 + trace / b_small, g2 + trace / b_big  # E|G_B|² = |G|² + tr Σ / B
        assert noise_terms(small, big, b_small, b_big) == pytest.approx((g2, trace))
    with pytest.raises(ValueError, match="b_small < b_big"):
        noise_terms(1.0, 1.0, 8, 8)


def _linear_regression_noise(steps: int) -> tuple[float, float]:
    """On a pool rank: least squares y = x·w* + ε, x ~ N(0, I_d), ε ~ N(0, σ²), at w = w* + δ
    with |δ| = 1. The per-sample gradient (x·δ − ε) x has mean δ and tr Σ = (d + 1)|δ|² + σ² d."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    w_star = torch.randn(D)
    delta = torch.randn(D)
    delta /= delta.norm()
    model = nn.Linear(D, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_((w_star + delta)[None])
    reducer = GradientReducer(model, None, bucket_mb=1.0)
    mesh = ParallelMesh.build(device="cpu")
    monitor = BatchMonitor(reducer, mesh.dp_group, mesh.dp_size, B, 1, ema=0.997)
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        x = torch.randn(B, D, generator=gen)
        y = x @ w_star + SIGMA * torch.randn(B, generator=gen)
        loss = 0.5 * (model(x).squeeze(1) - y).pow(2).mean()
        loss.backward()  # the reducer averages over dp; the tap saw the local gradient first
        monitor.after_backward(model.weight.grad.norm().item())
        model.zero_grad(set_to_none=True)
    reducer.remove()
    analytic = ((D + 1) * 1.0 + SIGMA ** 2 * D) / 1.0
    return monitor.noise.value, analytic


def test_noise_scale_matches_the_analytic_value_on_linear_regression(pools):
    measured, analytic = pools(2).run(_linear_regression_noise, 1200)[0]
    assert analytic == pytest.approx(11.0)
    assert abs(measured - analytic) <= 0.25 * analytic, (measured, analytic)


def test_adaptive_batch_doubles_while_the_noise_scale_is_large_and_scales_the_lr():
    mon = BatchMonitor(GradientReducer(nn.Linear(2, 2), None), None, dp=2, micro_batch=2, grad_accum=1, adaptive=True,
                       max_global_batch=16, interval=2, lr_rule="adascale")
    mon.noise = NoiseScale(ema=0.0, g2=1.0, trace=100.0, updates=5)  # B_noise = 100
    assert mon.next_grad_accum(1) is None  # not a decision step
    assert mon.next_grad_accum(2) == 2 and mon.global_batch == 8
    # AdaScale gain for S = 2 with σ² = 100/4 = 25, μ² = 1: (25 + 1) / (12.5 + 1).
    assert mon.lr_factor() == pytest.approx(26 / 13.5)
    assert mon.next_grad_accum(4) == 4 and mon.global_batch == 16
    assert mon.next_grad_accum(6) is None  # max_global_batch reached
    mon.noise = NoiseScale(ema=0.0, g2=1.0, trace=6.0, updates=5)  # B_noise 6 < 2 × 4
    mon.grad_accum, mon.max_global_batch = 1, 1000
    assert mon.next_grad_accum(8) is None
    assert adascale_gain(0.0, 1.0, 4, 16) == pytest.approx(1.0)  # no noise: no gain
    sqrt = BatchMonitor(GradientReducer(nn.Linear(2, 2), None), None, dp=2, micro_batch=2, grad_accum=1, adaptive=True, lr_rule="sqrt")
    sqrt.grad_accum = 4
    assert sqrt.lr_factor() == pytest.approx(math.sqrt(4))


def _train_with_noise_scale(cfg_dict):
    cfg = Config.from_dict(cfg_dict)
    trainer = Trainer(cfg, ParallelMesh.build(device="cpu"), *load_splits(cfg))
    trainer.fit()
    return trainer.batch_monitor.state_dict()


def test_trainer_logs_the_noise_scale_and_decides_the_batch_from_it(tmp_path, pools):
    cfg = tiny_run_config(tmp_path, train={"steps": 6, "micro_batch_size": 2},
                          elastic={"noise_scale": True, "noise_ema": 0.5, "adaptive_batch": True,
                                   "adapt_interval": 2, "max_global_batch": 1000})
    states = pools(2).run(_train_with_noise_scale, cfg.to_dict())
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(records) == 6 and all(math.isfinite(r["grad_sq_small"]) for r in records)
    assert all(math.isfinite(r["noise_scale"]) for r in records)
    # Each decision step (every 2nd) doubles the batch exactly when B_noise ≥ 2 × the batch;
    # the lr factor moves with it.
    for at in records[1:]:
        if at["step"] % 2 == 0:
            grows = at["noise_scale"] >= 2 * at["global_batch"]
            nxt = next((r for r in records if r["step"] == at["step"] + 1), None)
            if nxt is not None:
                assert nxt["global_batch"] == at["global_batch"] * (2 if grows else 1), records
        assert (at["lr_factor"] == 1.0) == (at["global_batch"] == 4)
    assert states[0] == states[1]  # every rank decided the same
