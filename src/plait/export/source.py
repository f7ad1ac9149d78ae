"""The plain model an export starts from: a GPT or the digits MLP, out of any plait checkpoint.

A run folder (its newest valid checkpoint), a `step_*` folder, or a parameter-server run, whose
parameters are assembled from its servers' shards. Every file is verified by checksum before it
is read (:func:`plait.train.checkpoint.load_checkpoint`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from plait.config import Config
from plait.errors import CheckpointError
from plait.generate import assemble_server_shards, config_of, find_checkpoint
from plait.models.build import build_model
from plait.train.checkpoint import load_checkpoint


@dataclass
class Source:
    """A loaded model (CPU, eval mode), its run config, and the checkpoint folder(s) it came from."""

    model: nn.Module
    cfg: Config
    checkpoint: Path
    skipped: list[str]

    @property
    def arch(self) -> str:
        return self.cfg.model.arch


def load_source(path: str | Path) -> Source:
    """The model of the run or checkpoint folder at `path`, whatever layout trained it."""
    found = find_checkpoint(path)
    if found.server_parts:
        model, cfg = assemble_server_shards(found)
        return Source(model.eval(), cfg, found.path, found.skipped)
    parts = load_checkpoint(found.path)
    cfg = config_of(parts.get("state", {}), found.path)
    if "model" not in parts:
        raise CheckpointError(f"checkpoint {str(found.path)!r} lacks model.pt")
    model = build_model(cfg.model, seed=0)
    try:
        model.load_state_dict(parts["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {str(found.path)!r} does not fit the model.arch="
                              f"{cfg.model.arch!r} model its config describes: {exc}") from None
    return Source(model.eval(), cfg, found.path, found.skipped)
