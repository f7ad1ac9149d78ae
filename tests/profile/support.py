"""Runs shared by the profile tests: a short traced training on the worker pool."""

from __future__ import annotations

from typing import Any

from plait.config import Config
from plait.data.dataset import load_token_splits
from plait.mesh import ParallelMesh
from plait.train.trainer import Trainer


def train_run(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Train per `cfg_dict` on this rank; its history, final parameters and dp split."""
    cfg = Config.from_dict(cfg_dict)
    mesh = ParallelMesh.build(dp=cfg.parallel.dp, pp=cfg.parallel.pp)
    train, val = load_token_splits(cfg.data.path, cfg.model.block_size, cfg.data.val_fraction)
    trainer = Trainer(cfg, mesh, train, val)
    summary = trainer.fit()
    params = {k: v.detach().clone() for k, v in trainer.model.module.state_dict().items()}
    partition = getattr(trainer.model, "partition", None)
    return {"history": summary["history"], "params": params, "split": trainer.perf.split,
            "bounds": partition.bounds if partition is not None else None}
