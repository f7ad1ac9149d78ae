"""Sharded checkpoints (torch.distributed.checkpoint): saved at one layout, loaded at another with
parameters and optimizer state equal; damaged shards refused with fallback; gathered ones still
load; serving's loader reads them whole."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from plait.config import Config
from plait.data.dataset import load_token_splits
from plait.mesh import ParallelMesh
from plait.parallel.sharded_state import flat_range_boxes, tp_boxes
from plait.parallel.tensor_parallel.shard import ShardSpec
from plait.train import checkpoint as ck
from plait.train.trainer import Trainer
from tests.helpers import max_abs_diff, tiny_run_config


def _trainer(cfg: Config, mesh: ParallelMesh | None = None) -> Trainer:
    train, val = load_token_splits(cfg.data.path, cfg.model.block_size, cfg.data.val_fraction)
    return Trainer(cfg, mesh or ParallelMesh.single(), train, val)


def _gathered(trainer: Trainer) -> dict | None:
    """The layout-independent (gathered) model and optimizer state, on the main rank."""
    return trainer.model.checkpoint_state(trainer.optimizer)


def _assert_same(a: dict, b: dict) -> None:
    assert max_abs_diff(a["model"], b["model"]) == 0.0
    sa, sb = a["optim"]["state"], b["optim"]["state"]
    assert sorted(sa) == sorted(sb) and sa
    for i in sa:
        assert float(sa[i]["step"]) == float(sb[i]["step"])
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)
    ga = [{k: v for k, v in g.items() if k != "params"} for g in a["optim"]["param_groups"]]
    gb = [{k: v for k, v in g.items() if k != "params"} for g in b["optim"]["param_groups"]]
    assert [g["weight_decay"] for g in ga] == [g["weight_decay"] for g in gb]


def test_boxes_cover_every_element_once():
    for shape in [(7,), (3, 5), (2, 3, 4)]:
        n = math.prod(shape)
        full = torch.arange(n).view(shape)
        for lo, hi in [(0, n), (1, n - 1), (4, 6), (n - 1, n)]:
            seen = torch.zeros(shape, dtype=torch.long)
            flat = full.reshape(-1)[lo:hi]
            for off, sizes, start in flat_range_boxes(lo, hi - lo, shape):
                region = tuple(slice(o, o + s) for o, s in zip(off, sizes))
                assert torch.equal(flat[start:start + math.prod(sizes)].view(sizes), full[region])
                seen[region] += 1
            assert seen.reshape(-1)[lo:hi].eq(1).all() and seen.sum() == hi - lo
    # fused qkv rows over tp=2, and a padded vocabulary over tp=3: each element once, padding never
    for spec, shape, tp in [(ShardSpec(0, 12, fused=3), (12, 4), 2), (ShardSpec(0, 7, pad=True), (7, 2), 3),
                            (ShardSpec(1, 6), (3, 6), 2)]:
        full, seen = torch.randn(shape), torch.zeros(shape)
        for r in range(tp):
            shard = spec.shard(full, r, tp)
            for off, view in tp_boxes(spec, r, tp, (0,) * shard.dim(), shard):
                region = tuple(slice(o, o + s) for o, s in zip(off, view.shape))
                assert torch.equal(view, full[region])
                seen[region] += 1
        assert seen.eq(1).all()


def _save_at(cfg_dict: dict, steps: int) -> dict | None:
    """Train `steps` steps at the config's layout, write a sharded checkpoint, return the state."""
    cfg = Config.from_dict(cfg_dict)
    p = cfg.parallel
    trainer = _trainer(cfg, ParallelMesh.build(dp=p.dp, pp=p.pp, tp=p.tp))
    while trainer.step < steps:
        trainer.train_step()
    trainer.save()
    trainer.durability.close()
    return _gathered(trainer)


def _load_at(cfg_dict: dict) -> dict | None:
    cfg = Config.from_dict(cfg_dict)
    p = cfg.parallel
    mesh = ParallelMesh.build(dp=p.dp, pp=p.pp, tp=p.tp) if dist.is_initialized() else ParallelMesh.single()
    trainer = _trainer(cfg, mesh)
    assert trainer.step == 2 and trainer.resumed_from is not None
    return _gathered(trainer)


@pytest.mark.parametrize("saved,loaded", [
    ({"dp": 2, "zero": 2}, {"tp": 2}),
    ({"tp": 2}, {"dp": 2, "zero": 3}),
    ({"pp": 2}, {"dp": 1}),
])
def test_sharded_checkpoint_loads_at_another_layout(pools, tmp_path, saved, loaded):
    base = dict(train={"steps": 4, "micro_batch_size": 2}, checkpoint={"format": "sharded"})
    cfg = tiny_run_config(tmp_path, parallel=saved, **base)
    before = pools(2).run(_save_at, cfg.to_dict(), 2)[0]
    root = tmp_path / "run" / "checkpoints" / "step_00000002"
    manifest = ck.verify_checkpoint(root)
    assert manifest["format"] == ck.SHARDED_FORMAT
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "state.pt"} <= set(manifest["files"])
    assert not (root / "model.pt").exists()  # nothing was gathered
    resumed = tiny_run_config(tmp_path, parallel=loaded, train=base["train"],
                              checkpoint={"format": "sharded", "resume": "auto"})
    n = math.prod(max(1, loaded.get(k, 1)) for k in ("dp", "pp", "tp"))
    after = pools(n).run(_load_at, resumed.to_dict())[0] if n > 1 else _load_at(resumed.to_dict())
    _assert_same(before, after)


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_shard_is_refused_and_the_newest_valid_one_is_used(tmp_path):
    cfg = tiny_run_config(tmp_path, train={"steps": 3},
                          checkpoint={"format": "sharded", "interval": 1, "keep": 5})
    _trainer(cfg).fit()
    root = tmp_path / "run" / "checkpoints"
    _flip(root / "step_00000003" / "__0_0.distcp")
    with pytest.raises(ck.CheckpointError, match="__0_0.distcp fails its SHA-256"):
        ck.verify_checkpoint(root / "step_00000003")
    resumed = _trainer(tiny_run_config(tmp_path, train={"steps": 3},
                                       checkpoint={"format": "sharded", "resume": "auto"}))
    assert resumed.step == 2 and resumed.resumed_from.name == "step_00000002"
    assert (root / "step_00000003.damaged").is_dir()


def test_gathered_and_sharded_checkpoints_load_both_ways(tmp_path):
    """An old gathered checkpoint resumes a sharded run and vice versa, to the same state; the
    serving/export loader reads a sharded one into the plain model's full state dict."""
    gathered = _trainer(tiny_run_config(tmp_path, train={"steps": 2}))
    gathered.fit()
    sharded = _trainer(tiny_run_config(tmp_path, train={"steps": 2, "out_dir": str(tmp_path / "s")},
                                       checkpoint={"format": "sharded", "resume": "auto"}))
    sharded.fit()  # resumes nothing (its own folder is empty); trains the same two steps
    a = _trainer(tiny_run_config(tmp_path, train={"steps": 2}, checkpoint={"format": "sharded",
                                                                            "resume": "auto"}))
    b = _trainer(tiny_run_config(tmp_path, train={"steps": 2, "out_dir": str(tmp_path / "s")},
                                 checkpoint={"resume": "auto"}))
    assert a.step == b.step == 2
    _assert_same(_gathered(a), _gathered(b))
    _assert_same(_gathered(a), _gathered(gathered))
    full = ck.load_checkpoint(tmp_path / "s" / "checkpoints" / "step_00000002")
    plain = gathered.model.module.state_dict()
    assert full["model"].keys() == plain.keys()  # the tied head included
    assert max_abs_diff(full["model"], plain) == 0.0
