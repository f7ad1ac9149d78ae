"""What the engine serves: a plait checkpoint (any training layout) or a Hugging Face GPT-2 folder."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from plait.errors import CheckpointError
from plait.models.gpt import GPT
from plait.models.hf_gpt2 import is_hf_folder, load_hf_gpt2
from plait.serve.text import Bytes, HFTokenizer, Tokenizer, has_hf_tokenizer

log = logging.getLogger(__name__)

HF_PREFIX = "hf:"


def load_for_serving(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer, str]:
    """(model in eval mode, its tokenizer, a model name) for `path`.

    `path` is a run folder (its newest valid checkpoint), a `step_*` checkpoint folder, a
    quantized checkpoint folder (`plait quantize`, see :mod:`plait.serve.quantize.store`), or a GPT-2
    folder (`config.json` + safetensors), which may also be written `hf:PATH`. A GPT-2 folder
    with tokenizer files uses that tokenizer; otherwise plait's byte tokenizer is used.
    """
    text = str(path)
    hf = text.startswith(HF_PREFIX)
    folder = Path(text[len(HF_PREFIX):] if hf else text)
    if hf or is_hf_folder(folder):
        model = load_hf_gpt2(folder, device)
        if has_hf_tokenizer(folder):
            try:
                tok: Tokenizer = HFTokenizer(folder, model.cfg.vocab_size)
            except ImportError:
                raise CheckpointError(f"{str(folder)!r} has a Hugging Face tokenizer, which needs "
                                      "transformers: pip install 'plait[hf]'") from None
        else:
            tok = Bytes()
            log.info("%s has no tokenizer files: using plait's byte tokenizer", folder)
        return model, tok, folder.resolve().name

    from plait.serve.quantize.store import is_quantized_folder, load_quantized

    if is_quantized_folder(folder):
        return load_quantized(folder, device)[0], Bytes(), folder.resolve().name

    from plait.generate import find_checkpoint, load_model

    found = find_checkpoint(folder)
    model, _ = load_model(found, device=str(device))
    name = folder.resolve().name
    if (folder / "manifest.json").is_file() and folder.resolve().parent.name == "checkpoints":
        name = folder.resolve().parent.parent.name  # a step_* folder: named after its run
    return model, Bytes(), name


def load_checkpoint_gpt(path: str | Path, device: str | torch.device = "cpu") -> GPT:
    """The GPT of a plait run or checkpoint folder (saved under any training layout), in eval mode."""
    from plait.generate import load_model

    return load_model(path, device=str(device))[0]
