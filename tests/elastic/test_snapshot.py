"""In-memory snapshots: a restart loads the shared-memory copy when it is newer than the newest
disk checkpoint, under another layout too, and the run goes on as if never interrupted."""

from __future__ import annotations

import pytest

from plait.config import Config
from plait.data.dataset import load_token_splits
from plait.elastic.snapshot import find_snapshot
from plait.mesh import ParallelMesh
from plait.train import checkpoint as ck
from plait.train.trainer import Trainer
from tests.helpers import max_abs_diff, tiny_run_config


def _trainer(cfg: Config, mesh: ParallelMesh) -> Trainer:
    train, val = load_token_splits(cfg.data.path, cfg.model.block_size, cfg.data.val_fraction)
    return Trainer(cfg, mesh, train, val)


def _crash_after(cfg_dict: dict, steps: int) -> int:
    """Train with a disk checkpoint every 2 steps and a snapshot every step; stop after `steps`
    without a final checkpoint, as a crashed process would."""
    trainer = _trainer(Config.from_dict(cfg_dict), ParallelMesh.build())
    summary = trainer.fit(until=steps)
    trainer.durability.snapshots.close(remove=False)  # the files outlive the process
    trainer.durability.close()
    return summary["step"]


def test_snapshot_newer_than_disk_is_used_on_restart(pools, tmp_path):
    shm = tmp_path / "shm"
    common = dict(model={"dropout": 0.0}, train={"steps": 5, "micro_batch_size": 2})
    cfg = tiny_run_config(tmp_path, checkpoint={"interval": 2, "snapshot": True, "snapshot_dir": str(shm),
                                                "preemption": False, "format": "sharded"}, **common)
    assert pools(2).run(_crash_after, cfg.to_dict(), 3) == [3, 3]
    assert [p.name for p in ck.list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_00000002"]
    snap = find_snapshot(shm)
    assert snap is not None and snap.step == 3 and snap.world == 2

    # Restart in one process with the same global batch: step 3 comes from shared memory.
    resumed_cfg = tiny_run_config(tmp_path, model={"dropout": 0.0},
                                  train={"steps": 5, "micro_batch_size": 4},
                                  checkpoint={"resume": "auto", "snapshot": True, "snapshot_dir": str(shm),
                                              "preemption": False})
    trainer = _trainer(resumed_cfg, ParallelMesh.single())
    assert trainer.step == 3 and "snapshot" in str(trainer.resumed_from)
    losses = [h["loss"] for h in trainer.fit()["history"]]
    assert find_snapshot(shm) is None  # a completed run removes its snapshots

    ref_cfg = tiny_run_config(tmp_path, model={"dropout": 0.0},
                              train={"steps": 5, "micro_batch_size": 4, "out_dir": str(tmp_path / "ref")})
    ref = _trainer(ref_cfg, ParallelMesh.single())
    ref_losses = [h["loss"] for h in ref.fit()["history"]]
    assert losses == pytest.approx(ref_losses[3:], abs=1e-5)
    assert max_abs_diff(trainer.model.module.state_dict(), ref.model.module.state_dict()) < 1e-5


def test_a_torn_snapshot_is_not_used(tmp_path):
    """A slot whose index is missing (the copy was interrupted) leaves the other slot's step."""
    shm = tmp_path / "shm"
    cfg = tiny_run_config(tmp_path, train={"steps": 5},
                          checkpoint={"snapshot": True, "snapshot_dir": str(shm), "preemption": False})
    trainer = _trainer(cfg, ParallelMesh.single())
    trainer.fit(until=3)
    trainer.durability.snapshots.close(remove=False)
    assert find_snapshot(shm).step == 3
    (shm / "rank_00000.slot1.pt").unlink()  # step 3 was in slot 1
    assert find_snapshot(shm).step == 2
    (shm / "rank_00000.slot0.bin").write_bytes(b"")  # data shorter than its index says
    assert find_snapshot(shm) is None
