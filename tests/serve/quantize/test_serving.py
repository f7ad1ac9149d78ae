"""Quantized checkpoints end to end: `plait quantize`, loading in the engine and `plait generate`,
batch invariance of quantized layers, and every bad input refused by name."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plait.cli import main
from plait.errors import CheckpointError, ConfigError
from plait.models import GPT
from plait.serve import Engine, EngineConfig, SamplingParams
from plait.serve.commands import generate_text
from plait.serve.quantize.linear import Int4Linear, Int8Linear
from plait.serve.quantize.model import quantize_model, scheme_of
from plait.serve.quantize.store import load_quantized, save_quantized
from tests.serve.support import tiny_gpt_config, write_run


def lively(model: GPT) -> GPT:
    """Wider weights than GPT-2's initialisation, so greedy outputs vary from token to token."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qrun")
    run_dir, model = write_run(root / "run")
    lively(model)  # rewrite the checkpoint with the livelier weights
    from plait.train.checkpoint import load_checkpoint, save_checkpoint

    ckpt = run_dir / "checkpoints" / "step_00000010"
    parts = load_checkpoint(ckpt)
    parts["model"] = model.state_dict()
    save_checkpoint(run_dir / "checkpoints", 10, parts)
    return run_dir


@pytest.fixture(scope="module")
def int8_dir(run) -> Path:
    out = run.parent / "int8"
    assert main(["quantize", str(run), str(out), "--weights", "int8"]) == 0
    return out


def prompts(n: int = 6, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randint(1, 40))] for _ in range(n)]


def test_quantized_folder_loads_as_written_and_serves_what_load_time_quantization_serves(run, int8_dir):
    manifest = json.loads((int8_dir / "manifest.json").read_text())
    assert manifest["format"] == "plait-quantized/1" and manifest["step"] == 10
    assert set(manifest["files"]) == {"model.pt", "state.pt"}
    model, state = load_quantized(int8_dir)
    assert state["quantization"]["weights"] == "int8" and scheme_of(model) == "int8"
    direct = quantize_model(Engine.from_path(run).model, "int8")
    for a, b in zip(model.state_dict().items(), direct.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1])
    params = SamplingParams(max_tokens=12, temperature=0)
    from_folder = Engine.from_path(int8_dir, EngineConfig(max_seqs=4)).generate(prompts(3), params)
    at_load = Engine.from_path(run, EngineConfig(max_seqs=4, quantize="int8")).generate(prompts(3), params)
    assert [c.token_ids for c in from_folder] == [c.token_ids for c in at_load]
    assert len({t for c in from_folder for t in c.token_ids}) > 3  # a model that says something


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_batched_greedy_equals_one_at_a_time(run, weights):
    """Continuous batching of quantized layers: each request's tokens as if it ran alone."""
    engine = Engine.from_path(run, EngineConfig(max_seqs=4, prefill_chunk=16, quantize=weights))
    assert isinstance(engine.model.blocks[0].attn.qkv, Int8Linear if weights == "int8" else Int4Linear)
    params = SamplingParams(max_tokens=16, temperature=0)
    ps = prompts(8, seed=1)
    batched = [c.token_ids for c in engine.generate(ps, params)]
    alone = [engine.generate([p], params)[0].token_ids for p in ps]
    assert batched == alone
    # The engine's KV-cached path gives the quantized model's own (unbatched) greedy tokens.
    idx = torch.tensor([ps[0]])
    ref = engine.model.generate(idx, 16, temperature=0)[0, idx.shape[1]:].tolist()
    assert alone[0] == ref


def test_generate_reads_quantized_folders_and_quantizes_at_load(run, int8_dir, capsys):
    text = generate_text(int8_dir, "hello", 10, 0.0, 0, 0)
    assert text == generate_text(run, "hello", 10, 0.0, 0, 0, quantize="int8")
    assert main(["generate", str(int8_dir), "--prompt", "hello", "--max-new-tokens", "10", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == text + "\n"
    # Longer than the context: the sliding-window path runs the quantized model too.
    assert len(generate_text(int8_dir, "x" * 120, 20, 0.0, 0, 0)) == 140


def test_bf16_and_int4_cli_and_refusals(run, tmp_path, capsys):
    for weights in ("bf16", "int4"):
        assert main(["quantize", str(run), str(tmp_path / weights), "--weights", weights]) == 0
        assert scheme_of(load_quantized(tmp_path / weights)[0]) == weights
    capsys.readouterr()
    # An unsupported bit width, an existing OUT, a missing run, a group size that does not fit.
    assert main(["quantize", str(run), str(tmp_path / "x"), "--weights", "int3"]) == 2
    assert "--weights='int3' is not a supported weight format; valid: int8, int4, bf16" in capsys.readouterr().err
    assert main(["quantize", str(run), str(tmp_path / "int4"), "--weights", "int8"]) == 2
    assert "already exists; pass a new folder" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "missing"), str(tmp_path / "y"), "--weights", "int8"]) == 2
    assert "does not exist; pass a run folder" in capsys.readouterr().err
    assert main(["quantize", str(run), str(tmp_path / "z"), "--weights", "int4", "--group-size", "48"]) == 2
    assert "group_size=48 does not divide the 64 inputs" in capsys.readouterr().err
    assert not (tmp_path / "z").exists() and not list(tmp_path.glob(".tmp-*"))
    # Serving an int4 folder as int8 would re-quantize rounded weights.
    with pytest.raises(ConfigError, match="already int4"):
        Engine.from_path(tmp_path / "int4", EngineConfig(quantize="int8"))
    with pytest.raises(ConfigError, match="quantize='int2' is not a supported weight format"):
        EngineConfig(quantize="int2").check()
    with pytest.raises(SystemExit) as exc:  # argparse's choices: usage and exit status 2
        main(["generate", str(run), "--quantize", "int3"])
    assert exc.value.code == 2 and "invalid choice: 'int3'" in capsys.readouterr().err


def test_corrupted_checkpoints_are_refused(run, int8_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(int8_dir, bad)
    data = bytearray((bad / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "model.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.pt fails its SHA-256 check"):
        Engine.from_path(bad)
    (bad / "model.pt").write_bytes(bytes(data[:100]))
    with pytest.raises(CheckpointError, match=r"model.pt is 100 bytes, the manifest says \d+ \(truncated"):
        load_quantized(bad)
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest.json is corrupted"):
        load_quantized(bad)
    with pytest.raises(CheckpointError, match="does not exist or is not a folder"):
        load_quantized(tmp_path / "nothing")
    # A corrupted source: the run's only checkpoint fails its checksum, so nothing is written.
    src = tmp_path / "src"
    shutil.copytree(run, src)
    ckpt = src / "checkpoints" / "step_00000010" / "model.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:-10] + b"0123456789")
    assert main(["quantize", str(src), str(tmp_path / "out"), "--weights", "int8"]) == 2
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        from plait.generate import find_checkpoint
        find_checkpoint(src)


def test_save_refuses_a_float_model(tmp_path):
    from plait.config import Config

    with pytest.raises(ConfigError, match="no quantized layers"):
        save_quantized(GPT(tiny_gpt_config()), Config(model=tiny_gpt_config()), tmp_path / "q")


def test_quantize_help_imports_no_torch():
    code = ("import sys\nfrom plait.cli import main\ntry:\n    main(['quantize', '--help'])\n"
            "except SystemExit:\n    pass\nprint('TORCH', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
    assert "--weights" in out and out.strip().endswith("TORCH False")
