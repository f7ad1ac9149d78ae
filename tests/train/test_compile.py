"""train.compile: compiled training equals eager training, alone and data-parallel, and writes
the same checkpoints."""

from __future__ import annotations

import pytest

from plait.config import Config
from plait.data.dataset import load_token_splits
from plait.mesh import ParallelMesh
from plait.train.checkpoint import load_checkpoint
from plait.train.trainer import Trainer
from tests.helpers import max_abs_diff, tiny_run_config
from tests.train.test_trainer import train_and_report


@pytest.mark.parametrize("backend,tol", [
    ("aot_eager", 1e-6),  # the same kernels through AOTAutograd's graphs
    ("inductor", 1e-5),  # generated kernels: fused, so rounded in another order
])
def test_compiled_training_matches_eager(tmp_path, backend, tol):
    eager = train_and_report(tiny_run_config(tmp_path, train={"out_dir": str(tmp_path / "eager")}).to_dict(),
                             world_mesh=False)
    cfg = tiny_run_config(tmp_path, train={"compile": True, "compile_backend": backend,
                                           "out_dir": str(tmp_path / "compiled"), "eval_interval": 5})
    compiled = train_and_report(cfg.to_dict(), world_mesh=False)
    assert compiled["losses"] == pytest.approx(eager["losses"], abs=tol)
    assert compiled["grad_norms"] == pytest.approx(eager["grad_norms"], rel=1e-4)
    assert max_abs_diff(compiled["params"], eager["params"]) < tol
    assert compiled["val"] is not None  # the evaluation (no grad, eval mode) ran compiled too
    # Compiled in place: the checkpoint's keys are the plain model's, so an eager run resumes it.
    saved = load_checkpoint(tmp_path / "compiled" / "checkpoints" / "step_00000005")
    assert set(saved["model"]) == set(eager["params"])


def test_compiled_data_parallel_matches_one_process(pools, tmp_path):
    ref = train_and_report(tiny_run_config(tmp_path, train={"micro_batch_size": 8}).to_dict(), world_mesh=False)
    cfg = tiny_run_config(tmp_path, train={"micro_batch_size": 4, "compile": True, "compile_backend": "aot_eager",
                                           "out_dir": str(tmp_path / "dp")}, parallel={"bucket_mb": 0.01})
    for r in pools(2).run(train_and_report, cfg.to_dict()):
        assert max_abs_diff(r["params"], ref["params"]) < 1e-5
        assert r["losses"] == pytest.approx(ref["losses"], abs=1e-5)


def test_an_eager_run_resumes_a_compiled_runs_checkpoint(tmp_path):
    first = tiny_run_config(tmp_path, train={"steps": 3, "compile": True, "compile_backend": "aot_eager"})
    train_and_report(first.to_dict(), world_mesh=False)
    cfg = tiny_run_config(tmp_path, train={"steps": 5}, checkpoint={"resume": "auto"})
    train, val = load_token_splits(cfg.data.path, cfg.model.block_size, cfg.data.val_fraction)
    trainer = Trainer(Config.from_dict(cfg.to_dict()), ParallelMesh.single(), train, val)
    assert trainer.step == 3
    assert trainer.fit()["step"] == 5
