"""Resuming: damaged checkpoints are never trained over, the metrics file has each step once,
rank 0 chooses the checkpoint for every rank, and per-rank CUDA RNG state travels."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from plait.config import Config
from plait.data.dataset import load_token_splits
from plait.errors import CheckpointError
from plait.mesh import ParallelMesh
from plait.train import checkpoint as ck
from plait.train.metrics import read_metrics
from plait.train.trainer import Trainer
from tests.helpers import tiny_run_config


def _data(cfg: Config):
    return load_token_splits(cfg.data.path, cfg.model.block_size, cfg.data.val_fraction)


def _trainer(cfg: Config) -> Trainer:
    return Trainer(cfg, ParallelMesh.single(), *_data(cfg))


def _flip(path):
    f = path / "model.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def _run(tmp_path, resume: str = "auto", steps: int = 3, interval: int = 1) -> Config:
    return tiny_run_config(tmp_path, train={"steps": steps},
                           checkpoint={"resume": resume, "interval": interval, "keep": 5})


def test_auto_resume_with_only_damaged_checkpoints_stops_and_changes_nothing(tmp_path):
    _trainer(_run(tmp_path, "none")).fit()
    ckpts = ck.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000001", "step_00000002", "step_00000003"]
    for p in ckpts:
        _flip(p)
    before = {p.name: (p / "model.pt").read_bytes() for p in ckpts}
    with pytest.raises(CheckpointError, match='resume="auto" found no checkpoint .* verifies') as err:
        _trainer(_run(tmp_path, "auto"))
    assert "--fresh" in str(err.value) and "SHA-256" in str(err.value)
    assert {p.name: (p / "model.pt").read_bytes() for p in ckpts} == before

    # Starting afresh, explicitly: the damaged folders in the way are kept, not overwritten.
    _trainer(_run(tmp_path, "none")).fit()
    root = tmp_path / "run" / "checkpoints"
    for name, data in before.items():
        assert (root / f"{name}.damaged" / "model.pt").read_bytes() == data
        ck.verify_checkpoint(root / name)  # the new run's own checkpoint of that step


def test_auto_resume_sets_newer_damaged_checkpoints_aside(tmp_path):
    _trainer(_run(tmp_path, "none")).fit()
    root = tmp_path / "run" / "checkpoints"
    _flip(root / "step_00000003")
    damaged = (root / "step_00000003" / "model.pt").read_bytes()
    trainer = _trainer(_run(tmp_path, "auto"))
    assert trainer.step == 2 and trainer.resumed_from.name == "step_00000002"
    assert (root / "step_00000003.damaged" / "model.pt").read_bytes() == damaged
    trainer.fit()
    ck.verify_checkpoint(root / "step_00000003")


def test_resumed_run_drops_the_stale_tail_of_metrics(tmp_path):
    """A run that reached step 4 but whose last checkpoint is step 2 (it crashed before saving
    again): resuming at 2 must not leave steps 3 and 4 twice in metrics.jsonl."""
    _trainer(_run(tmp_path, "none", steps=4, interval=2)).fit()
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000004")
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]
    trainer = _trainer(_run(tmp_path, "auto", steps=4, interval=2))
    assert trainer.step == 2
    trainer.fit()
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]
    # Starting afresh begins a new file.
    _trainer(_run(tmp_path, "none", steps=2, interval=2)).fit()
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]


def test_drop_after_keeps_records_without_a_step_and_drops_a_torn_line(tmp_path):
    from plait.train.metrics import drop_after

    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in
                              [{"event": "start"}, {"step": 1}, {"step": 2}, {"step": 3}]) + '\n{"st')
    assert drop_after(path, 1) == 3
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"event": "start"}, {"step": 1}]


def _pick_with_a_lagging_view(cfg_dict: dict, lagging_out_dir: str) -> tuple[int, str]:
    """Rank 1 looks at a folder without the newest checkpoints (a stale view of a shared
    filesystem); rank 0's choice must still be the one every rank resumes from."""
    import torch.distributed as dist

    raw = json.loads(json.dumps(cfg_dict))
    if dist.get_rank() == 1:
        raw["train"]["out_dir"] = lagging_out_dir
    cfg = Config.from_dict(raw)
    trainer = Trainer(cfg, ParallelMesh.build(), *_data(cfg))
    return trainer.step, str(trainer.resumed_from)


def test_rank_0_chooses_the_checkpoint_for_every_rank(pools, tmp_path):
    _trainer(_run(tmp_path, "none", steps=2)).fit()
    lagging = tmp_path / "lagging"
    (lagging / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "run" / "checkpoints" / "step_00000001",
                    lagging / "checkpoints" / "step_00000001")
    cfg = _run(tmp_path, "auto", steps=2)
    results = pools(2).run(_pick_with_a_lagging_view, cfg.to_dict(), str(lagging))
    chosen = str(tmp_path / "run" / "checkpoints" / "step_00000002")
    assert results == [(2, chosen), (2, chosen)]


class FakeCuda:
    """Stands in for torch.cuda's generator functions on a machine without CUDA."""

    def __init__(self) -> None:
        self.state = torch.arange(8, dtype=torch.uint8)
        self.restored: list[torch.Tensor] = []
        self.seeded: list[int] = []

    def get_rng_state(self, device=None):
        return self.state.clone()

    def set_rng_state(self, state, device=None):
        self.restored.append(state)

    def manual_seed(self, seed):
        self.seeded.append(seed)


def test_cuda_rng_state_is_saved_and_restored_per_rank(tmp_path, monkeypatch):
    trainer = _trainer(_run(tmp_path, "none", steps=1))
    trainer.fit()
    fake = FakeCuda()
    monkeypatch.setattr(torch.cuda, "get_rng_state", fake.get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", fake.set_rng_state)
    monkeypatch.setattr(torch.cuda, "manual_seed", fake.manual_seed)
    trainer.device = torch.device("cuda", 0)  # as on a GPU: only the generator calls are faked
    path = trainer.save()
    state = ck.load_checkpoint(path)["state"]
    assert [t.tolist() for t in state["cuda_rng"]] == [fake.state.tolist()]

    fresh = _trainer(_run(tmp_path, "none", steps=1))
    fresh.device = torch.device("cuda", 0)
    fresh._load_rng(state)
    assert [t.tolist() for t in fake.restored] == [fake.state.tolist()]
    # A checkpoint saved on the CPU has no CUDA states: the CUDA stream is re-seeded instead.
    fresh._load_rng({k: v for k, v in state.items() if k != "cuda_rng"})
    assert len(fake.seeded) == 1 and len(fake.restored) == 1


def test_cpu_checkpoints_carry_no_cuda_state(tmp_path):
    trainer = _trainer(_run(tmp_path, "none", steps=1))
    trainer.fit()
    state = ck.load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000001")["state"]
    assert "cuda_rng" not in state and len(state["rng"]) == 1
