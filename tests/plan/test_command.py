"""`plait plan`: search, predict one layout, JSON, --emit a config that trains, --check a run."""

from __future__ import annotations

import json

import pytest

from plait.cli import main
from plait.config import load_config, validate
from plait.plan import calibrate
from plait.plan.layout import compile_layout
from plait.plan.shapes import shape_from_config
from tests.helpers import tiny_run_config
from tests.plan.test_cost import _calibration

KEYS = {"dp", "pp", "tp", "zero", "microbatches", "recompute", "step_s", "tokens_per_s", "tflops_per_gpu", "mem_gb"}


def _json(capsys, *argv) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_search_prints_ranked_layouts_as_json(capsys):
    out = _json(capsys, "--model", "gpt-1.3b", "--gpus", "16", "--gpu", "a100", "--top", "4")
    layouts = out["layouts"]
    assert len(layouts) == 4 and all(KEYS <= set(row) for row in layouts)
    assert [r["step_s"] for r in layouts] == sorted(r["step_s"] for r in layouts)
    for r in layouts:
        assert r["dp"] * r["pp"] * r["tp"] == 16 and r["mem_gb"] <= 80
        assert r["tokens_per_s"] == pytest.approx(512 * 2048 / r["step_s"])
    assert out["model"]["params"] == pytest.approx(1.3e9, rel=0.05)


def test_layout_predicts_one_layout(capsys):
    out = _json(capsys, "--model", "gpt-13b", "--gpu", "h100", "--layout", "tp=8,pp=4,dp=2,mb=1,schedule=1f1b",
                "--global-batch", "512", "--seq", "2048")
    assert {(r["tp"], r["pp"], r["dp"], r["schedule"]) for r in out["layouts"]} == {(8, 4, 2, "1f1b")}
    assert out["cluster"]["devices"] == 64


def test_table_and_reasoning(capsys):
    assert main(["plan", "--model", "gpt-350m", "--gpus", "8", "--gpu", "b200", "--top", "2"]) == 0
    text = capsys.readouterr().out
    assert "dp·pp·tp" in text and "per step" in text and "memory per device" in text


def test_emit_writes_a_config_plait_accepts(tmp_path, capsys):
    path = tmp_path / "plan.toml"
    assert main(["plan", "--model", "examples/3d_2x2x2.toml", "--gpus", "8", "--gpu", "a100-40gb",
                 "--layout", "pp=2,tp=2", "--emit", str(path)]) == 0
    cfg = load_config(path)
    validate(cfg, world_size=8)
    p = cfg.parallel
    assert (p.pp, p.tp, p.dp) == (2, 2, 2) and p.layout == {"batch": "dp", "heads": "tp", "mlp": "tp",
                                                             "vocab": "tp", "layers": "pp"}
    compiled = compile_layout(p.layout, shape_from_config(cfg.model), dp=p.dp, pp=p.pp, tp=p.tp)
    assert compiled.full_tensor_parallel
    assert cfg.data.path == "" and cfg.model.n_embd == 128  # the rest of the config is kept


@pytest.mark.parametrize("argv,message", [
    (["--model", "gpt-9", "--gpus", "8"], "model 'gpt-9' is unknown"),
    (["--model", "gpt-1.3b", "--gpus", "8", "--gpu", "v100"], "--gpu 'v100' is unknown"),
    (["--model", "gpt-1.3b"], "--gpus N is required"),
    (["--model", "gpt-1.3b", "--gpus", "8", "--layout", "tp=two"], "--layout tp='two' must be an integer"),
    (["--model", "gpt-1.3b", "--gpus", "8", "--layout", "width=2"], "--layout entry 'width=2'"),
    (["--model", "gpt-1t", "--gpus", "8", "--gpu", "a100"], "no layout fits in 80 GB per device"),
    (["--model", "gpt-1.3b", "--gpus", "8", "--layout", "tp=3"], "no layout of 8 devices with --layout tp=3"),
    (["--model", "gpt-1.3b", "--gpus", "8", "--software", "deepspeed"], "--software 'deepspeed' is unknown"),
])
def test_bad_input_is_refused_with_a_reason(capsys, argv, message):
    assert main(["plan", *argv]) == 2
    assert message in capsys.readouterr().err.replace("\n", " ")


def test_check_compares_a_finished_run_with_its_prediction(tmp_path, capsys, monkeypatch):
    """A real (one-process, CPU) run, predicted on this CPU from a calibration record."""
    from plait.data.dataset import load_token_splits
    from plait.mesh import ParallelMesh
    from plait.train.trainer import Trainer

    cfg = tiny_run_config(tmp_path, train={"steps": 6, "log_interval": 1, "device": "cpu"})
    train, val = load_token_splits(cfg.data.path, cfg.model.block_size, cfg.data.val_fraction)
    Trainer(cfg, ParallelMesh.single(), train, val).fit()
    monkeypatch.setenv("PLAIT_CACHE_DIR", str(tmp_path / "cache"))
    calibrate.cache_path().parent.mkdir(parents=True)
    calibrate.cache_path().write_text(json.dumps({calibrate._key(1): _calibration()}))
    out = _json(capsys, "--check", cfg.train.out_dir, "--threads", "1")
    assert out["world"] == 1 and out["steps_measured"] == 5  # the first logged step is warm-up
    assert out["measured_step_s"] > 0 and out["predicted_step_s"] > 0
    assert out["error"] == pytest.approx(out["predicted_step_s"] / out["measured_step_s"] - 1)
    assert main(["plan", "--check", cfg.train.out_dir, "--threads", "1"]) == 0
    assert "predicted vs measured" in capsys.readouterr().out
    assert main(["plan", "--check", str(tmp_path / "nowhere")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
