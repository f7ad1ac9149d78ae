"""Preemption: SIGTERM on one rank makes every rank finish the step, write one checkpoint and
stop; resumed at another layout (dp=2 -> dp=1 x tp=2) the loss curve goes on unchanged."""

from __future__ import annotations

import os
import signal

import pytest

from plait.config import Config
from plait.data.dataset import load_token_splits
from plait.elastic.preemption import Preemption
from plait.mesh import ParallelMesh
from plait.train import checkpoint as ck
from plait.train.trainer import Callbacks, Trainer
from tests.helpers import tiny_run_config


def _trainer(cfg: Config, mesh: ParallelMesh, callbacks: Callbacks | None = None) -> Trainer:
    train, val = load_token_splits(cfg.data.path, cfg.model.block_size, cfg.data.val_fraction)
    return Trainer(cfg, mesh, train, val, callbacks)


def _signalled_at(cfg_dict: dict, at: int) -> dict:
    """Train; the main rank sends itself SIGTERM during step `at`'s callback."""
    def on_step(record: dict) -> None:
        if record["step"] == at:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    cfg = Config.from_dict(cfg_dict)
    trainer = _trainer(cfg, ParallelMesh.build(dp=cfg.parallel.dp, tp=cfg.parallel.tp),
                       Callbacks(on_step=on_step))
    summary = trainer.fit()
    trainer.durability.close()
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is given back
    return {"step": summary["step"], "preempted": summary["preempted"],
            "losses": [h["loss"] for h in summary["history"]]}


def _resume(cfg_dict: dict) -> dict:
    cfg = Config.from_dict(cfg_dict)
    trainer = _trainer(cfg, ParallelMesh.build(dp=cfg.parallel.dp, tp=cfg.parallel.tp))
    start = trainer.step
    summary = trainer.fit()
    trainer.durability.close()
    return {"start": start, "losses": [h["loss"] for h in summary["history"]]}


def test_sigterm_checkpoints_and_resumes_at_another_layout(pools, tmp_path):
    common = dict(model={"dropout": 0.0}, checkpoint={"format": "sharded", "resume": "auto"})
    cfg = tiny_run_config(tmp_path, train={"steps": 5, "micro_batch_size": 2},
                          parallel={"dp": 2}, **common)
    out = pools(2).run(_signalled_at, cfg.to_dict(), 2)
    assert [o["step"] for o in out] == [2, 2]  # both ranks stopped after the same step
    assert out[0]["preempted"] == "SIGTERM" and out[1]["preempted"]  # rank 1 heard it from rank 0
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ck.list_checkpoints(root)] == ["step_00000002"]
    ck.verify_checkpoint(root / "step_00000002")

    # Another "machine": one dp replica split over tp=2, the same global batch.
    moved = tiny_run_config(tmp_path, train={"steps": 5, "micro_batch_size": 4},
                            parallel={"dp": 1, "tp": 2}, **common)
    resumed = pools(2).run(_resume, moved.to_dict())[0]
    assert resumed["start"] == 2

    ref = tiny_run_config(tmp_path, train={"steps": 5, "micro_batch_size": 4, "out_dir": str(tmp_path / "ref")},
                          model={"dropout": 0.0})
    straight = _resume_single(ref)
    assert out[0]["losses"] + resumed["losses"] == pytest.approx(straight, abs=1e-5)


def _resume_single(cfg: Config) -> list[float]:
    return [h["loss"] for h in _trainer(cfg, ParallelMesh.single()).fit()["history"]]


def test_handler_records_the_signal_and_gives_it_back():
    before = signal.getsignal(signal.SIGUSR1)
    p = Preemption(deadline_s=60)
    assert p.install()
    assert not p.agreed(None, 1)
    os.kill(os.getpid(), signal.SIGUSR1)
    assert p.agreed(None, 1) and p.signal_name == "SIGUSR1"
    p.finished()
    p.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is before
