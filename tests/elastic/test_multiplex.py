"""Multiplexing: two jobs time-sliced on the same processes each end bit-identical to the job
run alone; jobs that would collide are refused before anything starts."""

from __future__ import annotations

import argparse

import pytest
import torch

from plait.config import Config
from plait.elastic.command import add_arguments, load_jobs
from plait.elastic.multiplex import run_multiplexed
from plait.errors import ConfigError
from plait.mesh import ParallelMesh
from plait.train import checkpoint as ck
from plait.train.metrics import read_metrics
from plait.train.run import load_splits
from plait.train.trainer import Trainer
from tests.helpers import tiny_run_config


def _jobs(tmp_path, tag: str) -> list[dict]:
    a = tiny_run_config(tmp_path, train={"steps": 5, "out_dir": str(tmp_path / f"a-{tag}"), "seed": 1},
                        model={"dropout": 0.1})
    b = tiny_run_config(tmp_path, train={"steps": 7, "out_dir": str(tmp_path / f"b-{tag}"), "seed": 2,
                                         "lr": 1e-3, "grad_accum": 2})
    return [a.to_dict(), b.to_dict()]


def _alone(cfg_dict) -> int:
    cfg = Config.from_dict(cfg_dict)
    trainer = Trainer(cfg, ParallelMesh.build(device="cpu"), *load_splits(cfg))
    return trainer.fit()["step"]


def _multiplexed(cfg_dicts, quantum) -> list[dict]:
    return run_multiplexed([Config.from_dict(d) for d in cfg_dicts], ParallelMesh.build(device="cpu"), quantum)


def _final(out_dir) -> dict[str, torch.Tensor]:
    return ck.load_checkpoint(ck.latest_valid_checkpoint(out_dir / "checkpoints"))["model"]


def test_multiplexed_jobs_equal_the_jobs_run_alone(tmp_path, pools):
    pool = pools(2)
    for cfg in _jobs(tmp_path, "alone"):
        pool.run(_alone, cfg)
    summaries = pool.run(_multiplexed, _jobs(tmp_path, "mux"), 2)[0]
    assert [s["step"] for s in summaries] == [5, 7] and [s["slices"] for s in summaries] == [3, 4]
    for job in ("a", "b"):
        alone, mux = _final(tmp_path / f"{job}-alone"), _final(tmp_path / f"{job}-mux")
        for k in alone:  # dropout streams and all: bit for bit
            assert torch.equal(alone[k], mux[k]), (job, k)
        assert ([r["loss"] for r in read_metrics(tmp_path / f"{job}-alone")]
                == [r["loss"] for r in read_metrics(tmp_path / f"{job}-mux")])


def _args(argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_jobs_that_would_collide_are_refused(tmp_path):
    cfg = tmp_path / "a.toml"
    cfg.write_text('[train]\nout_dir = "runs/same"\n')
    with pytest.raises(ConfigError, match=r"train.out_dir='runs/same' is used by two"):
        load_jobs(_args([str(cfg), str(cfg)]))
    with pytest.raises(ConfigError, match="--set-job '5:train.steps=3' must be I:section.key=value with I in 0..1"):
        load_jobs(_args([str(cfg), str(cfg), "--set-job", "5:train.steps=3"]))
    with pytest.raises(ConfigError, match="different meshes"):
        load_jobs(_args([str(cfg), str(cfg), "--set-job", "1:train.out_dir=runs/b", "--set-job",
                         "1:parallel.tp=2", "--nproc", "2"]))
    with pytest.raises(ConfigError, match="--quantum 0 must be ≥ 1"):
        load_jobs(_args([str(cfg), str(cfg), "--quantum", "0"]))
    assert len(load_jobs(_args([str(cfg), str(cfg), "--set-job", "1:train.out_dir=runs/b"]))) == 2
