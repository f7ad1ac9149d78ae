"""Sampling text from a trained checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from plait.config import Config
from plait.data.tokenizer import ByteTokenizer
from plait.errors import CheckpointError, ConfigError
from plait.models import GPT
from plait.train.checkpoint import latest_valid_checkpoint, load_checkpoint


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its newest valid checkpoint)."""
    p = Path(path)
    if (p / "manifest.json").is_file():
        return p
    for root in (p / "checkpoints", p):
        found = latest_valid_checkpoint(root)
        if found is not None:
            return found
    raise CheckpointError(f"no valid checkpoint at {str(p)!r}; pass a run folder or a step_* folder")


def load_model(path: str | Path, device: str = "cpu") -> tuple[GPT, Config]:
    ckpt = resolve_checkpoint(path)
    parts = load_checkpoint(ckpt, map_location=device)
    try:
        cfg = Config.from_dict(parts["state"]["config"])
    except (KeyError, ConfigError) as exc:
        raise CheckpointError(f"checkpoint {str(ckpt)!r} carries no usable config: {exc}") from None
    model = GPT(cfg.model).to(device)
    model.load_state_dict(parts["model"])
    model.eval()
    return model, cfg


def sample(model: GPT, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
           top_k: int | None = 40, seed: int = 0, device: str = "cpu") -> str:
    """Continue `prompt`; the same seed gives the same text."""
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be ≥ 0")
    if temperature < 0:
        raise ConfigError(f"temperature={temperature} must be ≥ 0 (0 = greedy)")
    tok = ByteTokenizer()
    ids = tok.encode(prompt or "\n")
    idx = torch.tensor(ids, dtype=torch.long, device=device)[None, :]
    g = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=g)
    return tok.decode(out[0].tolist())
