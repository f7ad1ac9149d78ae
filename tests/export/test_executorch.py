"""`plait export RUN --format executorch OUT.pte`: the digits MLP lowered to XNNPACK, run by
ExecuTorch's runtime and checked against PyTorch (runs where the `executorch` extra is installed)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("executorch")

from plait.cli import main  # noqa: E402
from plait.export.executorch import load_method  # noqa: E402
from tests.export.support import mlp_config, trained_mlp, write_mlp_run  # noqa: E402
from tests.serve.support import one_intra_op_thread  # noqa: E402,F401


def test_mlp_pte_matches_pytorch_on_any_batch(tmp_path, capsys):
    cfg = mlp_config()
    model = trained_mlp(cfg, steps=20)
    run = write_mlp_run(tmp_path / "run", cfg, model)
    out = tmp_path / "pte" / "mlp.pte"
    assert main(["export", str(run), "--format", "executorch", str(out)]) == 0
    assert "XNNPACK" in capsys.readouterr().err
    method = load_method(out)
    for batch in (1, 7):
        x = torch.rand(batch, 64)
        with torch.no_grad():
            assert (method.execute([x])[0] - model(x)).abs().max().item() <= 1e-4
    assert main(["export", str(run), "--format", "executorch", str(out)]) == 2  # never replaced
    assert main(["export", str(run), "--format", "executorch", str(tmp_path / "m.onnx")]) == 2
    assert "must end in '.pte'" in capsys.readouterr().err
