"""The plain model an export starts from: a GPT or the digits MLP, out of any plait checkpoint.

A run folder (its newest valid checkpoint), a `step_*` folder, or a parameter-server run, whose
parameters are assembled from its servers' shards. Every file is verified by checksum before it
is read (:func:`plait.train.checkpoint.load_checkpoint`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from plait.config import Config
from plait.errors import CheckpointError, ConfigError
from plait.generate import Found, find_checkpoint
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


def _config(state: object, source: Path) -> Config:
    try:
        return Config.from_dict(state["config"])  # type: ignore[index]
    except (KeyError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"checkpoint {str(source)!r} carries no usable config: {exc}") from None


def _from_servers(found: Found) -> tuple[nn.Module, Config]:
    """A parameter-server run: each server holds a contiguous shard of the flat parameter vector."""
    from plait.parallel.parameter_server.sharding import FlatLayout

    parts = [load_checkpoint(p) for p in found.server_parts]
    cfg = _config(parts[0].get("state", {}), found.server_parts[0])
    model = build_model(cfg.model, seed=0)
    flat = FlatLayout.of(model)
    vector = torch.empty(flat.numel, dtype=flat.dtype)
    covered = 0
    for path, part in zip(found.server_parts, parts):
        shard = part.get("model", {})
        if shard.get("numel") != flat.numel or shard.get("n_servers") != len(parts):
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds a shard of a {shard.get('numel')}-element model on "
                f"{shard.get('n_servers')} servers; its config's model has {flat.numel} elements and "
                f"{len(parts)} server folders were found")
        start, stop = shard["bounds"]
        vector[start:stop] = shard["shard"]
        covered += stop - start
    if covered != flat.numel:
        raise CheckpointError(f"the server shards under {str(found.path)!r} cover {covered} of "
                              f"{flat.numel} parameters")
    with torch.no_grad():
        for slot, p in zip(flat.slots, flat.trainable(model)):
            p.copy_(vector[slot.offset:slot.offset + slot.numel].view(slot.shape))
    return model, cfg


def load_source(path: str | Path) -> Source:
    """The model of the run or checkpoint folder at `path`, whatever layout trained it."""
    found = find_checkpoint(path)
    if found.server_parts:
        model, cfg = _from_servers(found)
        return Source(model.eval(), cfg, found.path, found.skipped)
    parts = load_checkpoint(found.path)
    cfg = _config(parts.get("state", {}), found.path)
    if "model" not in parts:
        raise CheckpointError(f"checkpoint {str(found.path)!r} lacks model.pt")
    model = build_model(cfg.model, seed=0)
    try:
        model.load_state_dict(parts["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {str(found.path)!r} does not fit the model.arch="
                              f"{cfg.model.arch!r} model its config describes: {exc}") from None
    return Source(model.eval(), cfg, found.path, found.skipped)
