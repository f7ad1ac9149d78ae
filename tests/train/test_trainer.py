"""Trainer: data-parallel training equals one process; resume is bit-exact; dp can change."""

from __future__ import annotations

import pytest
import torch

from plait.config import Config
from plait.data.dataset import load_token_splits
from plait.errors import ConfigError
from plait.mesh import ParallelMesh
from plait.train.trainer import Trainer
from tests.helpers import max_abs_diff, tiny_run_config


def train_and_report(cfg_dict: dict, world_mesh: bool = True) -> dict:
    """Train per `cfg_dict` on this process's share (or alone); report params and losses."""
    cfg = Config.from_dict(cfg_dict)
    mesh = ParallelMesh.build(dp=cfg.parallel.dp) if world_mesh else ParallelMesh.single()
    train, val = load_token_splits(cfg.data.path, cfg.model.block_size, cfg.data.val_fraction)
    trainer = Trainer(cfg, mesh, train, val)
    summary = trainer.fit()
    params = {k: v.detach().clone() for k, v in trainer.model.module.state_dict().items()}
    return {"params": params, "losses": [h["loss"] for h in summary["history"]],
            "grad_norms": [h["grad_norm"] for h in summary["history"]],
            "val": summary["final_val_loss"], "step": trainer.step}


def _single(cfg: Config) -> dict:
    return train_and_report(cfg.to_dict(), world_mesh=False)


@pytest.mark.parametrize("world,accum,reducer,bucket_mb", [
    (2, 1, "bucketed", 25.0),
    (2, 2, "bucketed", 0.01),
    (4, 1, "bucketed", 0.01),
    (4, 2, "naive", 25.0),
])
def test_dp_training_matches_one_process(pools, tmp_path, world, accum, reducer, bucket_mb):
    global_batch = 8
    ref_cfg = tiny_run_config(tmp_path, train={"micro_batch_size": global_batch})
    ref = _single(ref_cfg)
    cfg = tiny_run_config(tmp_path, train={"micro_batch_size": global_batch // (world * accum),
                                           "grad_accum": accum, "out_dir": str(tmp_path / "dp")},
                          parallel={"reducer": reducer, "bucket_mb": bucket_mb})
    results = pools(world).run(train_and_report, cfg.to_dict())
    for r in results:
        assert max_abs_diff(r["params"], ref["params"]) < 1e-5
        assert r["losses"] == pytest.approx(ref["losses"], abs=1e-5)
        assert r["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5)
    # every rank holds the same parameters, bit for bit
    for r in results[1:]:
        assert max_abs_diff(r["params"], results[0]["params"]) == 0.0


def test_resume_is_bit_exact(pools, tmp_path):
    """5 steps straight vs 3 steps, stop, resume to 5: identical losses and parameters (dp=2)."""
    straight = tiny_run_config(tmp_path, train={"steps": 5, "out_dir": str(tmp_path / "a")},
                               model={"dropout": 0.1})
    full = pools(2).run(train_and_report, straight.to_dict())[0]
    # The same 5-step schedule, stopped after step 3 (a checkpoint is written), then resumed.
    cut = tiny_run_config(tmp_path, train={"steps": 5, "out_dir": str(tmp_path / "b")},
                          model={"dropout": 0.1})
    assert pools(2).run(_train_until, cut.to_dict(), 3) == [3, 3]
    resumed_cfg = tiny_run_config(tmp_path, train={"steps": 5, "out_dir": str(tmp_path / "b")},
                                  model={"dropout": 0.1}, checkpoint={"resume": "auto"})
    resumed = pools(2).run(train_and_report, resumed_cfg.to_dict())[0]
    assert resumed["losses"] == full["losses"][3:]
    assert max_abs_diff(resumed["params"], full["params"]) == 0.0


def _train_until(cfg_dict: dict, stop_at: int) -> int:
    cfg = Config.from_dict(cfg_dict)
    mesh = ParallelMesh.build()
    train, val = load_token_splits(cfg.data.path, cfg.model.block_size, cfg.data.val_fraction)
    trainer = Trainer(cfg, mesh, train, val)
    while trainer.step < stop_at:
        trainer.train_step()
    trainer.save()
    return trainer.step


@pytest.mark.parametrize("new_world", [1, 4])
def test_checkpoint_from_dp2_resumes_at_other_dp(pools, tmp_path, new_world):
    """Save at dp=2 after 3 steps; continue at dp=1 or dp=4 with the same global batch."""
    base = dict(steps=5, out_dir=str(tmp_path / "run"))
    cfg2 = tiny_run_config(tmp_path, train={**base, "micro_batch_size": 4})
    pools(2).run(_train_until, cfg2.to_dict(), 3)
    ref = pools(2).run(train_and_report, tiny_run_config(
        tmp_path, train={**base, "micro_batch_size": 4, "out_dir": str(tmp_path / "ref")}).to_dict())[0]
    cfg_new = tiny_run_config(tmp_path, train={**base, "micro_batch_size": 8 // new_world},
                              checkpoint={"resume": "auto"})
    if new_world == 1:
        out = train_and_report(cfg_new.to_dict(), world_mesh=False)
    else:
        out = pools(new_world).run(train_and_report, cfg_new.to_dict())[0]
    assert out["losses"] == pytest.approx(ref["losses"][3:], abs=1e-5)
    assert out["grad_norms"] == pytest.approx(ref["grad_norms"][3:], rel=1e-5)
    assert max_abs_diff(out["params"], ref["params"]) < 1e-5


def test_held_out_loss_falls(tmp_path):
    cfg = tiny_run_config(tmp_path, train={"steps": 30, "eval_interval": 30, "lr": 1e-2})
    out = _single(cfg)
    assert out["losses"][-1] < out["losses"][0] - 1.0
    assert out["val"] < 4.0  # ln(256) ≈ 5.55 at the start


def test_steps_that_run_ahead_of_the_host_settle_into_the_same_records(tmp_path, monkeypatch):
    """The GPU bookkeeping, forced on the CPU: values stay tensors between logged steps and are
    read back together; the history, the metrics file and the callbacks see what a step-by-step
    run sees."""
    from plait.data.dataset import load_token_splits
    from plait.train.metrics import read_metrics
    from plait.train.trainer import Callbacks

    def run(name: str, ahead: bool) -> tuple[dict, list[dict], list[int]]:
        monkeypatch.setattr(Trainer, "_steps_run_ahead", lambda self: ahead)
        cfg = tiny_run_config(tmp_path, train={"steps": 7, "log_interval": 3, "eval_interval": 5,
                                               "out_dir": str(tmp_path / name)}, checkpoint={"interval": 4})
        train, val = load_token_splits(cfg.data.path, cfg.model.block_size, cfg.data.val_fraction)
        seen: list[int] = []
        trainer = Trainer(cfg, ParallelMesh.single(), train, val,
                          Callbacks(on_step=lambda r: seen.append((r["step"], type(r["loss"])))))
        return trainer.fit(), read_metrics(tmp_path / name), seen

    plain, plain_file, plain_seen = run("plain", ahead=False)
    ahead, ahead_file, ahead_seen = run("ahead", ahead=True)
    for key in ("loss", "grad_norm", "lr"):
        assert [h[key] for h in ahead["history"]] == [h[key] for h in plain["history"]], key
    assert all(isinstance(h["loss"], float) and h["tokens_per_s"] > 0 for h in ahead["history"])
    assert ahead_seen == plain_seen == [(s, float) for s in range(1, 8)]  # every step, in order, as floats
    strip = lambda rows: [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k and k != "mfu"}
                          for r in rows]  # noqa: E731
    assert strip(ahead_file) == strip(plain_file)
    assert [r["step"] for r in ahead_file] == [0, 3, 5, 6, 7]  # eval at 0; log every 3; eval at 5; the end
    assert ahead["final_val_loss"] == plain["final_val_loss"]


@pytest.mark.parametrize("override,field", [
    ({"train": {"lr": -1.0}}, "train.lr"),
    ({"model": {"n_head": 3}}, "model.n_embd"),
    ({"parallel": {"tp": 2}}, "parallel.tp=2"),
    ({"parallel": {"dp": 2}}, "parallel.dp=2"),
])
def test_trainer_refuses_a_bad_config_before_building_anything(tmp_path, override, field):
    """A library caller gets the CLI's ConfigError, naming the field, and nothing is written."""
    cfg = tiny_run_config(tmp_path, **override)
    train, val = load_token_splits(cfg.data.path, cfg.model.block_size, cfg.data.val_fraction)
    with pytest.raises(ConfigError, match=field):
        Trainer(cfg, ParallelMesh.single(), train, val)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
