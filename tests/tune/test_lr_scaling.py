"""train.lr_scaling: the peak lr follows the global batch, and the metrics log the lr used."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from plait.config import Config, load_config
from plait.errors import ConfigError
from plait.mesh import ParallelMesh
from plait.optim import lr_at, lr_scale
from plait.train.run import load_splits
from plait.train.trainer import Trainer
from tests.tune.helpers import digits_base


def _train_and_read_lrs(cfg_dict: dict, single: bool = False) -> list[tuple[int, float]]:
    cfg = Config.from_dict(cfg_dict)
    mesh = ParallelMesh.single() if single else ParallelMesh.build(dp=cfg.parallel.dp)
    train, val = load_splits(cfg)
    Trainer(cfg, mesh, train, val).fit()
    lines = (Path(cfg.train.out_dir) / "metrics.jsonl").read_text().splitlines() if mesh.rank == 0 else []
    return [(r["step"], r["lr"]) for r in map(json.loads, lines) if "lr" in r]


def _cfg(tmp_path, **train) -> Config:
    raw = digits_base(tmp_path / "run", steps=6, warmup_steps=2, eval_interval=0, log_interval=1,
                      lr=1e-3, min_lr=1e-4, **train)
    return Config.from_dict(raw)


def test_dp2_micro8_linear_from_reference_8_logs_twice_the_lr(pools, tmp_path):
    cfg = _cfg(tmp_path, micro_batch_size=8, lr_scaling="linear", reference_batch=8)
    cfg.parallel.dp = 2
    logged = pools(2).run(_train_and_read_lrs, cfg.to_dict())[0]
    assert [s for s, _ in logged] == [1, 2, 3, 4, 5, 6]
    # Goyal et al.: global batch 2 × 8 = 16 is twice the reference 8, so lr and min_lr double;
    # warm-up and cosine keep their shape (step s is trained at the schedule's point s - 1).
    unscaled = dataclasses.replace(cfg.train, lr_scaling="none")
    for step, lr in logged:
        assert lr == pytest.approx(2 * lr_at(step - 1, unscaled), rel=1e-12)
    assert max(lr for _, lr in logged) == pytest.approx(2e-3)


def test_sqrt_scaling_in_one_process(tmp_path):
    cfg = _cfg(tmp_path, micro_batch_size=16, grad_accum=2, lr_scaling="sqrt", reference_batch=8)
    logged = _train_and_read_lrs(cfg.to_dict(), single=True)
    assert max(lr for _, lr in logged) == pytest.approx(1e-3 * math.sqrt(32 / 8))


def test_the_rule():
    t = Config().train
    assert lr_scale(dataclasses.replace(t, lr_scaling="none", reference_batch=8), 64) == 1.0
    assert lr_scale(dataclasses.replace(t, lr_scaling="linear", reference_batch=8), 64) == 8.0
    assert lr_scale(dataclasses.replace(t, lr_scaling="sqrt", reference_batch=16), 64) == 2.0
    assert lr_scale(dataclasses.replace(t, lr_scaling="linear", reference_batch=64), 16) == 0.25


@pytest.mark.parametrize("overrides,words", [
    (['train.lr_scaling="linear"'], "needs train.reference_batch ≥ 1"),
    (['train.lr_scaling="cubic"', "train.reference_batch=8"], "valid: none, linear, sqrt"),
    (["train.reference_batch=-1"], "train.reference_batch=-1 must be ≥ 0"),
])
def test_bad_scaling_fields_are_refused(overrides, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, overrides)
