"""What `plait serve` / `Engine.from_path` accept: run folders, step folders, GPT-2 folders (with
or without a tokenizer), and clear refusals of anything else."""

from __future__ import annotations

import json

import pytest
import torch

from plait.errors import CheckpointError
from plait.models.hf_gpt2 import save_hf_gpt2
from plait.serve import Engine, EngineConfig, SamplingParams
from plait.serve.loader import load_for_serving
from plait.serve.text import Bytes, HFTokenizer
from tests.serve.support import write_run


def byte_level_tokenizer_files(folder) -> None:
    """A GPT-2 byte-level BPE tokenizer with no merges: token id = byte value, as plait's."""
    # GPT-2's byte-to-character table: printable bytes map to themselves, the rest above 255.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    vocab = {chr(b if b in printable else next(extra)): b for b in range(256)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer",
                                                              "add_prefix_space": False}))


def test_names_and_tokenizers(tmp_path):
    run, model = write_run(tmp_path / "my run")
    _, tok, name = load_for_serving(run)
    assert name == "my run" and isinstance(tok, Bytes)
    step = next((run / "checkpoints").iterdir())
    assert load_for_serving(step)[2] == "my run"
    save_hf_gpt2(model, tmp_path / "gpt2 copy")
    loaded, tok, name = load_for_serving(f"hf:{tmp_path / 'gpt2 copy'}")
    assert name == "gpt2 copy" and isinstance(tok, Bytes)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_a_hf_tokenizer_in_the_folder_is_used(tmp_path):
    pytest.importorskip("transformers")
    _, model = write_run(tmp_path / "run")
    folder = tmp_path / "hf"
    save_hf_gpt2(model, folder)
    byte_level_tokenizer_files(folder)
    engine = Engine.from_path(folder, EngineConfig(max_seqs=2))
    assert isinstance(engine.tokenizer, HFTokenizer)
    assert engine.encode("héllo") == list("héllo".encode())
    reference = Engine(model, config=EngineConfig(max_seqs=2))
    params = SamplingParams(max_tokens=20, temperature=0.9, seed=2)
    a, b = engine.generate(["héllo"], params)[0], reference.generate(["héllo"], params)[0]
    assert a.token_ids == b.token_ids and a.text == b.text


def test_what_is_not_a_model_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_for_serving(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        load_for_serving(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="config.json"):
        load_for_serving(f"hf:{tmp_path / 'empty'}")
