"""The trainer on each device this machine has: the CPU always, CUDA where present (CI has none;
a GPU run covers the CUDA-only paths: NCCL at world size 1, bf16 autocast on the GPU, the CUDA
generator's state across a resume, compiled training with generated GPU kernels)."""

from __future__ import annotations

import pytest
import torch

from plait.config import Config
from plait.data.dataset import load_token_splits
from plait.mesh import ParallelMesh
from plait.train.trainer import Trainer
from tests.helpers import max_abs_diff, tiny_run_config, world_of_one

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def run(cfg: Config, mesh: ParallelMesh, until: int | None = None) -> dict:
    """Train `cfg` on `mesh` (to `until`, then checkpoint); losses and CPU copies of the parameters."""
    train, val = load_token_splits(cfg.data.path, cfg.model.block_size, cfg.data.val_fraction)
    trainer = Trainer(cfg, mesh, train, val)
    if until is None:
        losses = [h["loss"] for h in trainer.fit()["history"]]
    else:
        losses = [trainer.train_step()["loss"] for _ in range(until - trainer.step)]
        trainer.save()
    return {"losses": losses, "step": trainer.step,
            "params": {k: v.detach().float().cpu() for k, v in trainer.model.module.state_dict().items()}}


def config(tmp_path, name: str, device: str, dropout: float = 0.0, resume: str = "none", **train) -> Config:
    return tiny_run_config(tmp_path, train={"device": device, "dtype": "float32",
                                            "out_dir": str(tmp_path / name), **train},
                           model={"dropout": dropout}, checkpoint={"resume": resume})


@pytest.mark.parametrize("device", DEVICES)
def test_a_world_of_one_on_the_device_trains_as_the_cpu_reference(tmp_path, monkeypatch, device):
    ref = run(config(tmp_path, "ref", "cpu"), ParallelMesh.single())
    with world_of_one(monkeypatch, device) as mesh:
        assert mesh.device.type == device
        out = run(config(tmp_path, "dev", device), mesh)
    assert out["losses"] == pytest.approx(ref["losses"], abs=1e-4)
    assert max_abs_diff(out["params"], ref["params"]) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_trains_close_to_float32(tmp_path, device):
    steps = dict(steps=30, lr=1e-2)
    fp32 = run(config(tmp_path, "fp32", device, **steps), ParallelMesh.single(device))
    bf16 = run(config(tmp_path, "bf16", device, **steps, dtype="bfloat16"), ParallelMesh.single(device))
    assert bf16["losses"][-1] < bf16["losses"][0] - 1.0
    assert bf16["losses"][-1] == pytest.approx(fp32["losses"][-1], abs=0.1)


@pytest.mark.parametrize("device", DEVICES)
def test_resume_restores_the_dropout_stream_on_the_device(tmp_path, device):
    """5 steps straight against 3, a checkpoint, and 2 more in a new trainer, with dropout: the
    resumed steps draw the same masks (the CUDA generator's state travels in the checkpoint)."""
    mesh = ParallelMesh.single(device)
    straight = run(config(tmp_path, "a", device, dropout=0.1, steps=5), mesh)
    run(config(tmp_path, "b", device, dropout=0.1, steps=5), mesh, until=3)
    resumed = run(config(tmp_path, "b", device, dropout=0.1, resume="auto", steps=5), mesh)
    # On the CPU the kernels are deterministic; some CUDA backward kernels accumulate atomically.
    tol = 0.0 if device == "cpu" else 1e-5
    assert resumed["step"] == 5
    assert resumed["losses"] == pytest.approx(straight["losses"][3:], abs=tol)
    assert max_abs_diff(resumed["params"], straight["params"]) <= tol


@CUDA
def test_compiled_training_on_the_gpu_matches_eager(tmp_path):
    mesh = ParallelMesh.single("cuda")
    eager = run(config(tmp_path, "eager", "cuda"), mesh)
    compiled = run(config(tmp_path, "compiled", "cuda", compile=True), mesh)
    assert compiled["losses"] == pytest.approx(eager["losses"], abs=1e-4)
    assert max_abs_diff(compiled["params"], eager["params"]) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_fused_loss_under_bf16_trains_like_the_plain_loss(tmp_path, device):
    mesh = ParallelMesh.single(device)
    plain = run(config(tmp_path, "plain", device, dtype="bfloat16", steps=10, lr=1e-2), mesh)
    fused = run(config(tmp_path, "fused", device, dtype="bfloat16", steps=10, lr=1e-2, loss_chunk_rows=24), mesh)
    assert fused["losses"] == pytest.approx(plain["losses"], abs=0.02)
