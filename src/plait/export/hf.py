"""`plait export RUN_DIR --format hf OUT`: a checkpoint as a Hugging Face GPT2LMHeadModel folder."""

from __future__ import annotations

from pathlib import Path

from plait.errors import CheckpointError
from plait.models.hf_gpt2 import save_hf_gpt2


def export_hf(path: str | Path, out: str | Path) -> Path:
    """Write the model of a run or checkpoint folder at `path` to `out` (config.json + safetensors).

    The checkpoint may come from any training layout (checkpoints hold whole tensors). `out`
    must not hold a model already, so an export never silently replaces one.
    """
    from plait.serve.loader import load_checkpoint_gpt

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{str(out)!r} exists and is not an empty folder; choose a new folder to export to")
    return save_hf_gpt2(load_checkpoint_gpt(path), out)
