"""Checkpoints: atomic writes, refusal of truncated or corrupted files, and retention."""

from __future__ import annotations

import json
import os

import pytest
import torch

from plait.errors import CheckpointError
from plait.train import checkpoint as ck


def parts(v: float):
    return {"model": {"w": torch.full((4,), v)}, "optim": {"state": {}}, "state": {"step": int(v)}}


def test_round_trip_and_listing(tmp_path):
    for step in (1, 2, 3):
        ck.save_checkpoint(tmp_path, step, parts(step), keep=2)
    names = [p.name for p in ck.list_checkpoints(tmp_path)]
    assert names == ["step_00000002", "step_00000003"]  # keep=2 retained the newest two
    loaded = ck.load_checkpoint(tmp_path / "step_00000003")
    assert torch.equal(loaded["model"]["w"], torch.full((4,), 3.0))
    assert loaded["state"]["step"] == 3


def test_crash_mid_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    ck.save_checkpoint(tmp_path, 1, parts(1))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(tmp_path, 2, parts(2))
    monkeypatch.undo()
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000001"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]  # temp cleaned
    assert ck.latest_valid_checkpoint(tmp_path).name == "step_00000001"


def corrupt_truncate(path):
    f = path / "model.pt"
    f.write_bytes(f.read_bytes()[:-10])


def corrupt_flip(path):
    f = path / "model.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def corrupt_manifest(path):
    (path / "manifest.json").write_text("{not json")


def drop_manifest(path):
    os.remove(path / "manifest.json")


def wrong_format(path):
    m = json.loads((path / "manifest.json").read_text())
    m["format"] = "other/9"
    (path / "manifest.json").write_text(json.dumps(m))


def drop_file(path):
    os.remove(path / "optim.pt")


@pytest.mark.parametrize("damage,msg", [
    (corrupt_truncate, "truncated"),
    (corrupt_flip, "SHA-256"),
    (corrupt_manifest, "corrupted"),
    (drop_manifest, "incomplete"),
    (wrong_format, "format"),
    (drop_file, "missing optim.pt"),
])
def test_damaged_checkpoint_is_refused_and_previous_is_used(tmp_path, damage, msg):
    ck.save_checkpoint(tmp_path, 1, parts(1))
    newest = ck.save_checkpoint(tmp_path, 2, parts(2))
    damage(newest)
    with pytest.raises(CheckpointError, match=msg):
        ck.load_checkpoint(newest)
    assert ck.latest_valid_checkpoint(tmp_path).name == "step_00000001"


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ck.load_checkpoint(tmp_path / "step_00000009")
    assert ck.latest_valid_checkpoint(tmp_path / "nothing") is None


def test_a_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    from plait.config import Config
    from plait.data.dataset import load_token_splits
    from plait.mesh import ParallelMesh
    from plait.train.trainer import Trainer
    from tests.helpers import tiny_run_config

    cfg = tiny_run_config(tmp_path, train={"steps": 1})
    train, val = load_token_splits(cfg.data.path, 16, 0.1)
    Trainer(cfg, ParallelMesh.single(), train, val).fit()
    other = Config.from_dict({**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "n_embd": 64},
                              "checkpoint": {"resume": str(tmp_path / "run" / "checkpoints" / "step_00000001")}})
    with pytest.raises(CheckpointError, match="does not fit"):
        Trainer(other, ParallelMesh.single(), train, val)


def test_resaving_a_step_replaces_it_with_no_moment_without_a_valid_one(tmp_path, monkeypatch):
    """The old folder is deleted only after the new one is in place under the step's name."""
    final = ck.save_checkpoint(tmp_path, 1, parts(1))
    real_rmtree = ck.shutil.rmtree
    deleted = []

    def watched_rmtree(path, *a, **k):
        assert ck.Path(path) != final, "the checkpoint in place was deleted before its replacement"
        ck.verify_checkpoint(final)  # a valid step_1 exists at every deletion
        deleted.append(path)
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(ck.shutil, "rmtree", watched_rmtree)
    ck.save_checkpoint(tmp_path, 1, parts(5))
    assert deleted  # the old contents went, afterwards
    assert torch.equal(ck.load_checkpoint(final)["model"]["w"], torch.full((4,), 5.0))
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]


def test_resave_without_an_atomic_swap_never_deletes_first(tmp_path, monkeypatch):
    final = ck.save_checkpoint(tmp_path, 1, parts(1))
    monkeypatch.setattr(ck, "_exchange", lambda a, b: False)  # a filesystem without the swap
    ck.save_checkpoint(tmp_path, 1, parts(2))
    assert ck.load_checkpoint(final)["state"]["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]


def test_a_failed_resave_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    final = ck.save_checkpoint(tmp_path, 1, parts(1))

    def boom(a, b):
        raise OSError("disk gone")

    monkeypatch.setattr(ck, "_exchange", boom)
    with pytest.raises(OSError, match="disk gone"):
        ck.save_checkpoint(tmp_path, 1, parts(2))
    assert ck.load_checkpoint(final)["state"]["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]


def test_a_damaged_checkpoint_in_the_way_is_kept_not_overwritten(tmp_path):
    final = ck.save_checkpoint(tmp_path, 3, parts(3))
    corrupt_flip(final)
    damaged_bytes = (final / "model.pt").read_bytes()
    ck.save_checkpoint(tmp_path, 3, parts(4))
    assert ck.load_checkpoint(final)["state"]["step"] == 4
    kept = tmp_path / "step_00000003.damaged"
    assert (kept / "model.pt").read_bytes() == damaged_bytes
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000003"]


def test_pruning_keeps_the_new_checkpoint_and_ignores_newer_folders(tmp_path):
    """keep counts back from the step just saved: a newer folder (e.g. from an earlier run)
    neither displaces it nor gets deleted."""
    ck.save_checkpoint(tmp_path, 1, parts(1))
    ck.save_checkpoint(tmp_path, 5, parts(5))
    ck.save_checkpoint(tmp_path, 2, parts(2), keep=1)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000005"]


def test_newest_valid_checkpoint_says_what_it_refused(tmp_path):
    ck.save_checkpoint(tmp_path, 1, parts(1))
    newest = ck.save_checkpoint(tmp_path, 2, parts(2))
    corrupt_truncate(newest)
    path, refused = ck.newest_valid_checkpoint(tmp_path)
    assert path.name == "step_00000001"
    assert [(p.name, "truncated" in str(e)) for p, e in refused] == [("step_00000002", True)]
