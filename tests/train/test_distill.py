"""Knowledge distillation: the blended loss, a student trained by the Trainer and by `plait
distill` on two processes, dp/ZeRO parity, and bad teachers and fields."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from plait.cli import main
from plait.config import Config, validate
from plait.data.dataset import load_token_splits
from plait.errors import CheckpointError, ConfigError
from plait.mesh import ParallelMesh
from plait.models import GPT
from plait.train.distill import distillation_loss, load_teacher
from plait.train.trainer import Trainer
from tests.helpers import max_abs_diff, tiny_model_config, tiny_run_config
from tests.train.test_trainer import train_and_report


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> str:
    """A trained 2-block teacher run (12 steps on the generated corpus)."""
    tmp = tmp_path_factory.mktemp("teacher")
    cfg = tiny_run_config(tmp, train={"steps": 12, "out_dir": str(tmp / "teacher")})
    train, val = load_token_splits(cfg.data.path, cfg.model.block_size, cfg.data.val_fraction)
    Trainer(cfg, ParallelMesh.single(), train, val).fit()
    return str(tmp / "teacher")


def student_config(tmp_path, teacher: str, **train) -> Config:
    return tiny_run_config(tmp_path, model={"n_layer": 1}, distill={"teacher": teacher, "alpha": 0.7,
                                                                    "temperature": 2.0},
                           train={"steps": 4, **train})


def test_distillation_loss_is_the_blend_of_soft_kl_and_cross_entropy():
    torch.manual_seed(0)
    s, t = torch.randn(6, 11, requires_grad=True), torch.randn(6, 11)
    y = torch.randint(0, 11, (6,))
    T, alpha = 3.0, 0.25
    p_t = F.softmax(t / T, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / T, -1))).sum(-1).mean()
    expected = alpha * T * T * kl + (1 - alpha) * F.cross_entropy(s, y)
    got = distillation_loss(s, t, y, T, alpha)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert distillation_loss(s, t, y, T, 0.0).item() == pytest.approx(F.cross_entropy(s, y).item())
    assert distillation_loss(t, t, y, T, 1.0).item() == pytest.approx(0.0, abs=1e-6)  # student = teacher
    # The soft term's gradient is alpha · T · (softmax(s/T) - softmax(t/T)) / N.
    distillation_loss(s, t, y, T, 1.0).backward()
    expected_grad = T * (F.softmax(s / T, -1) - p_t) / s.size(0)
    assert torch.allclose(s.grad, expected_grad, atol=1e-6)


def test_student_first_step_loss_uses_the_teacher(teacher_dir, tmp_path):
    """The Trainer's first loss is the blend computed by hand from the teacher and the student's
    initial weights; held-out loss is plain cross-entropy; checkpoints hold the student only."""
    cfg = student_config(tmp_path, teacher_dir, steps=3, eval_interval=3)
    train, val = load_token_splits(cfg.data.path, cfg.model.block_size, cfg.data.val_fraction)
    trainer = Trainer(cfg, ParallelMesh.single(), train, val)
    torch.manual_seed(cfg.train.seed)
    student = GPT(cfg.model)
    teacher, _ = load_teacher(cfg)
    x, y = train.batch(trainer.sampler.permutation(0)[:cfg.train.micro_batch_size].tolist())
    with torch.no_grad():
        expected = distillation_loss(student(x), teacher(x), y, 2.0, 0.7).item()
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    summary = trainer.fit()
    assert summary["history"][0]["loss"] == pytest.approx(expected, rel=1e-5)
    # Held-out loss: the student's plain cross-entropy.
    module = trainer.model.module
    module.eval()
    xv, yv = val.batch(range(cfg.train.micro_batch_size))
    with torch.no_grad():
        plain = F.cross_entropy(module(xv).view(-1, 256), yv.reshape(-1)).item()
        assert module(xv, yv)[1].item() == pytest.approx(plain, rel=1e-6)
    # The teacher is outside the student: not trained, not in its parameters or checkpoint.
    held = module.loss_fn.teacher
    assert all(not p.requires_grad for p in held.parameters()) and not held.training
    assert max_abs_diff(held.state_dict(), teacher_before) == 0.0
    assert set(module.state_dict()) == set(GPT(cfg.model).state_dict())
    saved = torch.load(f"{summary['checkpoint']}/model.pt", weights_only=True)
    assert set(saved) == set(GPT(cfg.model).state_dict())


def test_distillation_under_zero2_matches_one_process(pools, teacher_dir, tmp_path):
    ref = train_and_report(student_config(tmp_path, teacher_dir, micro_batch_size=8).to_dict(),
                           world_mesh=False)
    cfg = student_config(tmp_path, teacher_dir, micro_batch_size=4, out_dir=str(tmp_path / "dp"))
    cfg.parallel.zero = 2
    out = pools(2).run(train_and_report, cfg.to_dict())
    for r in out:
        assert max_abs_diff(r["params"], ref["params"]) < 1e-5
        assert r["losses"] == pytest.approx(ref["losses"], abs=1e-5)


def test_plait_distill_on_two_processes(teacher_dir, tmp_path, capsys):
    cfg = tmp_path / "student.toml"
    corpus = json.dumps(str(tmp_path / "corpus.txt"))
    shutil.copy(f"{teacher_dir}/../corpus.txt", tmp_path / "corpus.txt")
    cfg.write_text("[model]\nn_layer = 1\nn_head = 2\nn_embd = 32\nblock_size = 16\n"
                   f"[data]\npath = {corpus}\nval_fraction = 0.1\n"
                   "[train]\nsteps = 3\nmicro_batch_size = 4\neval_interval = 3\nwarmup_steps = 1\nlog_interval = 1\n"
                   f"out_dir = {json.dumps(str(tmp_path / 'student'))}\n"
                   "[checkpoint]\nresume = \"none\"\n")
    assert main(["distill", str(cfg), "--teacher", teacher_dir, "--nproc", "2",
                 "--temperature", "1.5", "--set", "parallel.zero=1"]) == 0
    err = capsys.readouterr().err
    assert "student: 1 blocks" in err and "distillation summary" in err
    records = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    state = torch.load(tmp_path / "student" / "checkpoints" / "step_00000003" / "state.pt", weights_only=False)
    assert state["config"]["distill"]["temperature"] == 1.5
    assert state["config"]["model"]["n_layer"] == 1


# --- bad input --------------------------------------------------------------------------------


def test_vocab_and_context_mismatch(teacher_dir, tmp_path):
    cfg = tiny_run_config(tmp_path, model={"n_layer": 1, "vocab_size": 512},
                          distill={"teacher": teacher_dir})
    with pytest.raises(ConfigError, match=r"model.vocab_size=512 of the student does not match the "
                                          r"teacher's vocab_size=256"):
        load_teacher(cfg)
    cfg = tiny_run_config(tmp_path, model={"n_layer": 1, "block_size": 32}, distill={"teacher": teacher_dir})
    with pytest.raises(ConfigError, match=r"model.block_size=32 of the student exceeds the teacher's "
                                          r"block_size=16"):
        load_teacher(cfg)


def test_missing_and_corrupted_teacher(teacher_dir, tmp_path, capsys):
    cfg = tiny_run_config(tmp_path, distill={"teacher": str(tmp_path / "nowhere")})
    with pytest.raises(CheckpointError, match=r"distill.teacher=.*nowhere.* does not exist"):
        load_teacher(cfg)
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"distill.teacher=.*empty_run.*no valid checkpoint"):
        load_teacher(tiny_run_config(tmp_path, distill={"teacher": str(empty)}))
    bad = tmp_path / "bad"
    shutil.copytree(teacher_dir, bad)
    step = next((bad / "checkpoints").glob("step_*"))
    blob = bytearray((step / "model.pt").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (step / "model.pt").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=r"distill.teacher=.*bad.*(SHA-256|no valid checkpoint)"):
        load_teacher(tiny_run_config(tmp_path, distill={"teacher": str(step)}))
    # Through the command: refused before any process starts, naming the field.
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text(f"[data]\npath = {json.dumps(str(tmp_path / 'corpus.txt'))}\n"
                        f"[train]\nout_dir = {json.dumps(str(tmp_path / 'out'))}\n")
    assert main(["distill", str(cfg_file), "--teacher", str(bad)]) == 2
    assert "distill.teacher=" in capsys.readouterr().err
    assert main(["distill", str(cfg_file)]) == 2
    assert "needs a teacher: pass --teacher" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field,value,message", [
    ("temperature", 0.0, r"distill.temperature=0.0 must be a finite number > 0"),
    ("temperature", float("nan"), r"distill.temperature=nan must be a finite number > 0"),
    ("alpha", 1.5, r"distill.alpha=1.5 must be in \[0, 1\]"),
    ("alpha", -0.1, r"distill.alpha=-0.1 must be in \[0, 1\]"),
])
def test_bad_distill_fields(tmp_path, field, value, message):
    with pytest.raises(ConfigError, match=message):
        validate(tiny_run_config(tmp_path, distill={"teacher": "t", field: value}))


def test_bad_distill_table_and_layouts(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key distill.temprature; valid keys in distill"):
        tiny_run_config(tmp_path, distill={"temprature": 2.0})
    with pytest.raises(ConfigError, match=r"distill.alpha must be of type float"):
        tiny_run_config(tmp_path, distill={"alpha": "high"})
    with pytest.raises(ConfigError, match=r"distill.teacher cannot be combined with parallel.pp=2"):
        validate(tiny_run_config(tmp_path, distill={"teacher": "t"}, parallel={"pp": 2}))
    with pytest.raises(ConfigError, match=r"distill.teacher cannot be combined with parallel.tp=2"):
        validate(tiny_run_config(tmp_path, distill={"teacher": "t"}, parallel={"tp": 2}))
    validate(tiny_run_config(tmp_path, distill={"teacher": "t"}, parallel={"zero": 3}))  # dp layouts are fine
