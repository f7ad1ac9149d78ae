"""`plait export RUN --format onnx OUT [--int8]`: the GPT and the digits MLP run by ONNX Runtime,
checked against PyTorch; int8 files smaller and as accurate; bad checkpoints, formats and
output paths refused with clear errors."""

from __future__ import annotations

import argparse
import sys

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

from plait.cli import main  # noqa: E402
from plait.errors import ConfigError, ExportError  # noqa: E402
from plait.export.command import run as export_command  # noqa: E402
from plait.export.onnx import quantize_int8, run_session, session  # noqa: E402
from tests.export.support import mlp_config, trained_mlp, write_mlp_run, write_ps_run  # noqa: E402
from tests.serve.support import one_intra_op_thread, tiny_gpt_config, write_run  # noqa: E402,F401


def int8_weights(path) -> int:
    """Weight matrices stored in 8 bits (int8 matmul weights, uint8 embedding tables); zero
    points are 8-bit too, but vectors."""
    eight = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    return sum(t.data_type in eight and len(t.dims) == 2 for t in onnx.load(path).graph.initializer)


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt")
    run, model = write_run(root / "run [v1]", tiny_gpt_config(n_layer=1, block_size=32))
    out = root / "out" / "gpt.onnx"
    assert main(["export", str(run), "--format", "onnx", str(out)]) == 0
    return model, out


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlp")
    cfg = mlp_config()
    model = trained_mlp(cfg)
    run = write_mlp_run(root / "run", cfg, model)
    fp32, int8 = root / "mlp.onnx", root / "mlp.int8.onnx"
    assert main(["export", str(run), "--format", "onnx", str(fp32)]) == 0
    assert main(["export", str(run), "--format", "onnx", "--int8", str(int8)]) == 0
    return model, run, fp32, int8


def test_gpt_matches_pytorch_on_any_batch_and_length(gpt):
    model, path = gpt
    sess = session(path)
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert meta["plait.arch"] == "gpt" and '"block_size": 32' in meta["plait.model"]
    g = torch.Generator().manual_seed(1)
    for shape in [(1, 1), (4, 32), (2, 7)]:
        x = torch.randint(0, 256, shape, generator=g)
        with torch.no_grad():
            ref = model(x)
        got = torch.from_numpy(run_session(sess, x))
        assert got.shape == ref.shape
        assert (got - ref).abs().max().item() <= 1e-4


def test_gpt_int8_has_int8_weights_and_close_logits(gpt, tmp_path):
    model, path = gpt
    q = quantize_int8(path, tmp_path / "gpt.int8.onnx")
    assert int8_weights(q) == 4 + 2  # qkv, proj, fc, proj; both embeddings
    assert q.stat().st_size < 0.35 * path.stat().st_size
    text = torch.tensor([list(b"The quick brown fox jumps over the lazy dog. 0123456789")[:32]])
    with torch.no_grad():
        ref = model(text)
    got = torch.from_numpy(run_session(session(q), text))
    assert (got - ref).abs().mean().item() < 0.1 * ref.std().item()


def test_mlp_fp32_matches_and_int8_keeps_the_accuracy(mlp, tmp_path):
    from plait.data.digits import load_digits_splits

    model, _, fp32, int8 = mlp
    _, val = load_digits_splits(0.2)
    with torch.no_grad():
        ref = model(val.x)
    got = torch.from_numpy(run_session(session(fp32), val.x))
    assert (got - ref).abs().max().item() <= 1e-4
    assert int8_weights(int8) == 2
    assert int8.stat().st_size <= 0.30 * fp32.stat().st_size  # the edge benchmark's target
    # Fused (one op per layer, no zero points stored) and computing what the unfused graph does.
    graph = onnx.load(int8).graph
    assert [n.op_type for n in graph.node] == ["DynamicQuantizeMatMul", "Relu", "DynamicQuantizeMatMul"]
    assert sum(len(t.dims) == 1 and t.data_type == onnx.TensorProto.INT8 for t in graph.initializer) == 0
    plain = quantize_int8(fp32, tmp_path / "plain.int8.onnx", fuse=False)
    assert len(onnx.load(plain).graph.node) == 13 and plain.stat().st_size > int8.stat().st_size
    fused_logits = run_session(session(int8), val.x)
    assert abs(fused_logits - run_session(session(plain), val.x)).max() <= 1e-4
    accuracy = (ref.argmax(-1) == val.y).float().mean().item()
    accuracy_int8 = (torch.from_numpy(run_session(session(int8), val.x)).argmax(-1) == val.y).float().mean().item()
    assert accuracy > 0.9 and accuracy - accuracy_int8 <= 0.01
    one = run_session(session(int8), val.x[:1])
    assert one.shape == (1, 10)


def test_parameter_server_run_exports(tmp_path, mlp):
    model = mlp[0]
    run = write_ps_run(tmp_path / "ps", mlp_config(), model)
    out = tmp_path / "ps.onnx"
    assert main(["export", str(run), "--format", "onnx", str(out)]) == 0
    x = torch.rand(5, 64)
    with torch.no_grad():
        assert (torch.from_numpy(run_session(session(out), x)) - model(x)).abs().max().item() <= 1e-5


def test_missing_and_corrupted_checkpoints(tmp_path, mlp, capsys):
    _, run, _, _ = mlp
    out = tmp_path / "m.onnx"
    assert main(["export", str(tmp_path / "nowhere"), "--format", "onnx", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    # A copy of the run whose only checkpoint has a flipped byte in model.pt.
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    step = next((bad / "checkpoints").iterdir())
    blob = bytearray((step / "model.pt").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (step / "model.pt").write_bytes(bytes(blob))
    assert main(["export", str(step), "--format", "onnx", str(out)]) == 2
    assert "fails its SHA-256 check" in capsys.readouterr().err
    assert main(["export", str(bad), "--format", "onnx", str(out)]) == 2
    assert "no valid checkpoint" in capsys.readouterr().err
    # A newer corrupted checkpoint next to a valid one: the valid one is exported, and said so.
    shutil.copytree(step, bad / "checkpoints" / "step_00000009")
    shutil.copytree(run / "checkpoints" / step.name, step, dirs_exist_ok=True)
    assert main(["export", str(bad), "--format", "onnx", str(out)]) == 0
    assert "skipped:" in capsys.readouterr().err and out.is_file()
    # A checkpoint whose weights do not fit the model its config describes.
    cfg = mlp_config(hidden=32)
    write_mlp_run(tmp_path / "misfit", mlp_config(hidden=32), trained_mlp(cfg, steps=0))
    state = (tmp_path / "misfit" / "checkpoints" / "step_00000005")
    from plait.train.checkpoint import load_checkpoint, save_checkpoint
    parts = load_checkpoint(state)
    parts["state"]["config"]["model"]["n_embd"] = 64
    save_checkpoint(tmp_path / "misfit" / "checkpoints", 5, parts)
    assert main(["export", str(tmp_path / "misfit"), "--format", "onnx", str(tmp_path / "x.onnx")]) == 2
    assert "does not fit the model.arch='mlp' model" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_unknown_format_int8_elsewhere_and_bad_out(tmp_path, mlp, capsys):
    _, run, fp32, _ = mlp
    with pytest.raises(SystemExit) as exc:
        main(["export", str(run), "--format", "tflite", str(tmp_path / "m.tflite")])
    assert exc.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--format 'tflite' is unknown; valid: hf, onnx, executorch"):
        export_command(argparse.Namespace(path=str(run), out="m.tflite", format="tflite", int8=False))
    assert main(["export", str(run), "--format", "hf", "--int8", str(tmp_path / "hf")]) == 2
    assert "--int8 applies to --format onnx only" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "onnx", str(fp32)]) == 2
    assert "exists; choose a new file name" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "onnx", str(tmp_path / "folder")]) == 2
    assert "must end in '.onnx'" in capsys.readouterr().err
    assert not (tmp_path / "folder").exists()


def test_missing_extra_is_named(tmp_path, mlp, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if plait[edge] were not installed
    assert main(["export", str(mlp[1]), "--format", "onnx", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "needs onnxruntime" in err and "pip install 'plait[edge]'" in err


@pytest.mark.skipif("executorch" in sys.modules or __import__("importlib").util.find_spec("executorch"),
                    reason="executorch is installed: tests/export/test_executorch.py covers it")
def test_executorch_missing_is_named(tmp_path, mlp):
    with pytest.raises(ExportError, match=r"pip install 'plait\[executorch\]'"):
        export_command(argparse.Namespace(path=str(mlp[1]), out=str(tmp_path / "m.pte"),
                                          format="executorch", int8=False))
