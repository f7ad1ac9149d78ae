"""Hugging Face GPT-2 <-> plait GPT: the same logits both ways, refusals that name the field."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from plait.config import ModelConfig  # noqa: E402
from plait.errors import CheckpointError  # noqa: E402
from plait.models import GPT  # noqa: E402
from plait.models.hf_gpt2 import (hf_state_dict_from_gpt, is_hf_folder, load_hf_gpt2, load_hf_weights,  # noqa: E402
                                  save_hf_gpt2)

transformers.logging.set_verbosity_error()


def random_hf(tmp_path, **kw):
    torch.manual_seed(0)
    base = dict(vocab_size=256, n_positions=64, n_embd=48, n_layer=2, n_head=4, bos_token_id=None,
                eos_token_id=None)
    base.update(kw)
    hf = GPT2LMHeadModel(GPT2Config(**base)).eval()
    with torch.no_grad():  # biases and norms away from their zero/one init, so a mix-up shows
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path)
    return hf


def tokens(vocab: int, length: int = 40) -> torch.Tensor:
    return torch.randint(0, vocab, (3, length), generator=torch.Generator().manual_seed(1))


def test_hf_folder_loads_with_the_same_logits(tmp_path):
    hf = random_hf(tmp_path)
    assert is_hf_folder(tmp_path)
    ours = load_hf_gpt2(tmp_path)
    assert ours.cfg.n_layer == 2 and ours.cfg.block_size == 64 and ours.cfg.n_embd == 48
    x = tokens(256)
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.parametrize("bias", [True, False])
def test_plait_model_exports_with_the_same_logits(tmp_path, bias):
    torch.manual_seed(0)
    ours = GPT(ModelConfig(n_layer=2, n_head=4, n_embd=48, block_size=64, vocab_size=300, bias=bias)).eval()
    save_hf_gpt2(ours, tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    x = tokens(300)
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    assert diff <= 1e-5
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied on their side too


def test_round_trip_is_exact(tmp_path):
    torch.manual_seed(3)
    ours = GPT(ModelConfig(n_layer=3, n_head=2, n_embd=32, block_size=32))
    save_hf_gpt2(ours, tmp_path)
    back = load_hf_gpt2(tmp_path)
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("key,value,field", [
    ("activation_function", "relu", "activation_function"),
    ("n_inner", 100, "n_inner"),
    ("layer_norm_epsilon", 1e-6, "layer_norm_epsilon"),
    ("tie_word_embeddings", False, "tie_word_embeddings"),
    ("model_type", "llama", "model_type"),
    ("n_layer", "two", "n_layer"),
])
def test_unsupported_configs_are_refused_by_field(tmp_path, key, value, field):
    random_hf(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[key] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=field):
        load_hf_gpt2(tmp_path)


def test_damaged_folders_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf_gpt2(tmp_path)
    random_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_hf_gpt2(tmp_path)
    random_hf(tmp_path)
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="h.1.mlp.c_fc.bias"):
        load_hf_gpt2(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_hf_gpt2(tmp_path)


def test_weights_into_a_model_of_another_shape_are_refused(tmp_path):
    random_hf(tmp_path)
    with pytest.raises(CheckpointError, match="model.n_embd"):
        load_hf_weights(GPT(ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=64)), tmp_path)


def test_hf_state_dict_has_gpt2_names_and_layouts():
    torch.manual_seed(0)
    ours = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8))
    sd = hf_state_dict_from_gpt(ours)
    ref = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=8, n_embd=16, n_layer=1, n_head=2)).state_dict()
    assert set(sd) == set(ref) - {"lm_head.weight"}
    assert all(sd[k].shape == ref[k].shape for k in sd)


def test_training_starts_from_hf_weights(tmp_path):
    """model.init_from = "hf:PATH": the trainer's model holds the GPT-2 weights before step 1."""
    from plait.config import Config
    from plait.data.dataset import load_token_splits
    from plait.mesh import ParallelMesh
    from plait.train.trainer import Trainer
    from tests.helpers import tiny_run_config

    hf_dir = tmp_path / "gpt2"
    random_hf(hf_dir, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    raw = tiny_run_config(tmp_path).to_dict()
    raw["model"]["init_from"] = f"hf:{hf_dir}"
    raw["train"]["steps"] = 2
    cfg = Config.from_dict(raw)
    train, val = load_token_splits(cfg.data.path, cfg.model.block_size, cfg.data.val_fraction)
    trainer = Trainer(cfg, ParallelMesh.single(), train, val)
    got = {k: v for k, v in trainer.model.module.state_dict().items()}
    want = load_hf_gpt2(hf_dir).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    summary = trainer.fit()
    assert summary["step"] == 2
