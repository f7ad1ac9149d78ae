"""`plait export RUN --format hf OUT`, and the exported folder served, generated from and
checked against Hugging Face's own GPT2LMHeadModel."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from plait.cli import main  # noqa: E402
from plait.config import Config, ModelConfig  # noqa: E402
from plait.serve import Engine, SamplingParams  # noqa: E402
from plait.train.checkpoint import save_checkpoint  # noqa: E402
from tests.serve.support import one_intra_op_thread, tiny_gpt_config, write_run  # noqa: E402,F401

transformers.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run, model = write_run(root / "run [v1]", tiny_gpt_config(block_size=64))
    out = root / "hf [out]"
    assert main(["export", str(run), "--format", "hf", str(out)]) == 0
    return run, model, out


def test_export_matches_transformers_logits(exported):
    _, model, out = exported
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    x = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() <= 1e-5


def test_exported_folder_generates_and_serves_like_the_checkpoint(exported, capsys):
    run, _, out = exported
    args = ["--prompt", "hello", "--max-new-tokens", "20", "--temperature", "0.8", "--seed", "4"]
    assert main(["generate", str(run), *args]) == 0
    from_run = capsys.readouterr().out
    assert main(["generate", f"hf:{out}", *args]) == 0
    assert capsys.readouterr().out == from_run and from_run.startswith("hello")
    params = SamplingParams(max_tokens=15, temperature=0)
    a = Engine.from_path(run).generate(["one", "two"], params)
    b = Engine.from_path(out).generate(["one", "two"], params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]


def test_export_refuses_a_used_folder_and_a_non_gpt(exported, tmp_path, capsys):
    run, _, out = exported
    assert main(["export", str(run), "--format", "hf", str(out)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    cfg = Config(model=ModelConfig(arch="mlp"))
    cfg.data.dataset = "digits"
    save_checkpoint(tmp_path / "mlp" / "checkpoints", 1, {"model": {}, "state": {"config": cfg.to_dict()}})
    assert main(["export", str(tmp_path / "mlp"), "--format", "hf", str(tmp_path / "o")]) == 2
    assert "model.arch='mlp'" in capsys.readouterr().err
