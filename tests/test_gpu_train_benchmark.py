"""benchmarks/gpu_train.py on the CPU: the smoke run's JSON, the FLOPs counts, a failing child."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from plait.config import ModelConfig
from plait.models.gpt import GPT

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_train.py"


def _load():
    """The script as a module (it puts benchmarks/ on sys.path itself, for its `common` import)."""
    spec = importlib.util.spec_from_file_location("gpu_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_train"] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


gpu_train = _load()


def test_flops_per_token_formula_matches_both_models_at_every_size():
    for name, s in gpu_train.SIZES.items():
        with torch.device("meta"):  # shapes only: the 1.3B model allocates nothing
            plait_gpt = GPT(ModelConfig(n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd,
                                        block_size=s.block_size, vocab_size=s.vocab_size))
            ref = gpu_train.RefGPT(s)
        expected = gpu_train.flops_per_token(s)
        assert plait_gpt.flops_per_token(s.block_size) == expected, name
        assert ref.flops_per_token(s.block_size) == expected, name


def test_cpu_smoke_trains_both_sides_and_writes_the_json(tmp_path):
    out = tmp_path / "gpu_train.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--sizes", "tiny", "--warmup", "1",
                          "--steps", "2", "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "plait/ref step" in run.stdout  # the table
    d = json.loads(out.read_text())
    for key in ("ratio", "memory_ratio", "device", "mfu_1p3b", "matmul_peak_tflops", "sizes", "command", "target"):
        assert key in d, key
    assert d["device"].startswith("CPU") and d["mfu_1p3b"] is None and d["memory_ratio"] is None
    assert d["matmul_peak_tflops"] > 0 and d["ratio"] > 0
    tiny = d["sizes"]["tiny"]
    ref, ours = tiny["reference"], tiny["plait"]
    for rec in (ref, ours):
        assert "error" not in rec, rec.get("error")
        assert rec["losses_finite"] and math.isfinite(rec["loss_final"])
        assert rec["peak_memory_gb"] is None and rec["mfu_datasheet"] is None  # CPU: no allocator, no datasheet
        assert len(rec["step_times_s"]) == 2 and rec["tokens_per_s"] > 0
    assert ref["flops_per_token"] == ours["flops_per_token"] == gpu_train.flops_per_token(gpu_train.SIZES["tiny"])
    assert ours["backend"] == "gloo" and not ref["compiled"] and not ours["compiled"]
    assert tiny["ratio"] == ours["step_s"] / ref["step_s"] == d["ratio"]


def test_a_failing_child_is_recorded_not_raised(tmp_path):
    rec = gpu_train._child(["--one", "plait", "--size", "no-such-size", "--device", "cpu"], tmp_path, 60)
    assert "KeyError" in rec["error"] and "stderr_tail" in rec
