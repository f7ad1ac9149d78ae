"""Sampling text from a trained checkpoint.

A checkpoint is named by a `step_*` folder or by a run folder: then its newest checkpoint that
verifies is used, and :func:`find_checkpoint` says which newer ones were refused. A
parameter-server run of a GPT is read from its servers' shards (the newest step that every
server saved and that verifies).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from plait.config import Config
from plait.data.tokenizer import ByteTokenizer
from plait.errors import CheckpointError, ConfigError
from plait.models import GPT
from plait.train.checkpoint import (MANIFEST, checkpoint_step, list_checkpoints, load_checkpoint,
                                    newest_valid_checkpoint, verify_checkpoint)

log = logging.getLogger(__name__)

SERVER_DIR = re.compile(r"^server_(\d+)$")


@dataclass
class Found:
    """What :func:`find_checkpoint` chose.

    `path` is a `step_*` folder or, for a parameter-server run, its checkpoints folder (with
    `server_parts` the step folder of each server); `skipped` says why each newer checkpoint was
    refused.
    """

    path: Path
    skipped: list[str] = field(default_factory=list)
    server_parts: list[Path] = field(default_factory=list)


def _server_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and SERVER_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(SERVER_DIR.match(p.name).group(1)))


def _find_ps(root: Path, servers: list[Path]) -> Found:
    """The newest step every server saved and that verifies on each; else (async and ssp
    servers save at their own pace) each server's newest valid checkpoint."""
    indices = [int(SERVER_DIR.match(s.name).group(1)) for s in servers]
    if indices != list(range(len(servers))):
        raise CheckpointError(f"parameter-server checkpoints {str(root)!r} hold {', '.join(s.name for s in servers)}; "
                              f"server_0 … server_{len(servers) - 1} are all needed")
    steps = [{checkpoint_step(p): p for p in list_checkpoints(s)} for s in servers]
    skipped: list[str] = []
    for step in sorted(set.intersection(*(set(s) for s in steps)), reverse=True):
        try:
            for s in steps:
                verify_checkpoint(s[step])
        except CheckpointError as exc:
            skipped.append(str(exc))
            continue
        return Found(root, skipped, [s[step] for s in steps])
    parts = []
    for server in servers:
        path, refused = newest_valid_checkpoint(server)
        skipped += [str(exc) for _, exc in refused]
        if path is None:
            raise CheckpointError(f"no valid checkpoint of {server.name} under {str(root)!r}"
                                  + (f" ({'; '.join(skipped)})" if skipped else ""))
        parts.append(path)
    return Found(root, skipped, parts)


def find_checkpoint(path: str | Path) -> Found:
    """The checkpoint `path` names: itself (a `step_*` folder), or a run folder's newest valid one."""
    p = Path(path)
    if (p / MANIFEST).is_file():
        return Found(p)
    if not p.exists():
        raise CheckpointError(f"{str(p)!r} does not exist; pass a run folder (train.out_dir) or a "
                              "step_* checkpoint folder")
    skipped: list[str] = []
    for root in (p / "checkpoints", p):
        servers = _server_dirs(root)
        if servers:
            return _find_ps(root, servers)
        found, refused = newest_valid_checkpoint(root)
        skipped += [str(exc) for _, exc in refused]
        if found is not None:
            return Found(found, skipped)
    detail = f" ({'; '.join(skipped)})" if skipped else ""
    raise CheckpointError(f"no valid checkpoint at {str(p)!r}{detail}; pass a run folder or a step_* folder")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its newest valid checkpoint).

    A parameter-server run has no single checkpoint folder (each server holds a shard): it is
    refused here with a message that says so; :func:`load_model` reads it.
    """
    found = find_checkpoint(path)
    if found.server_parts:
        raise CheckpointError(
            f"{str(path)!r} is a parameter-server run: its parameters are sharded over "
            f"{len(found.server_parts)} server checkpoint(s), not one checkpoint folder; read it "
            "with plait.generate.load_model (as `plait generate` does)")
    return found.path


def config_of(state: dict, source: Path) -> Config:
    """The run config a checkpoint's state carries (a CheckpointError naming `source` if none)."""
    try:
        return Config.from_dict(state["config"])
    except (KeyError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"checkpoint {str(source)!r} carries no usable config: {exc}") from None


def _text_model_only(cfg: Config, source: Path) -> None:
    if cfg.model.arch != "gpt":
        raise CheckpointError(
            f"{str(source)!r} holds a model.arch={cfg.model.arch!r} model (the digits classifier), "
            "not a text model; plait generate samples text from GPT runs only")


def assemble_server_shards(found: Found, check: Callable[[Config], None] | None = None) -> tuple[nn.Module, Config]:
    """The model of a parameter-server run (CPU), assembled from its servers' shards of the flat
    parameter vector; `check` may refuse the run's config before anything is built."""
    from plait.models.build import build_model
    from plait.parallel.parameter_server.sharding import FlatLayout

    parts = [load_checkpoint(p) for p in found.server_parts]
    cfg = config_of(parts[0].get("state", {}), found.server_parts[0])
    if check is not None:
        check(cfg)
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


def _load_ps(found: Found, device: str) -> tuple[GPT, Config]:
    """Assemble a GPT from its servers' shards of the flat parameter vector."""
    run = found.path.parent if found.path.name == "checkpoints" else found.path
    model, cfg = assemble_server_shards(found, check=lambda cfg: _text_model_only(cfg, run))
    return model.to(device).eval(), cfg


def load_model(path: str | Path | Found, device: str = "cpu") -> tuple[GPT, Config]:
    """The GPT of a checkpoint, a run folder, or what :func:`find_checkpoint` found, in eval mode."""
    found = path if isinstance(path, Found) else find_checkpoint(path)
    if found.server_parts:
        return _load_ps(found, device)
    ckpt = found.path
    parts = load_checkpoint(ckpt, map_location=device)
    cfg = config_of(parts.get("state", {}), ckpt)
    _text_model_only(cfg, ckpt)
    if "model" not in parts:
        raise CheckpointError(f"checkpoint {str(ckpt)!r} lacks model.pt")
    model = GPT(cfg.model).to(device)
    try:
        model.load_state_dict(parts["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {str(ckpt)!r} does not fit the model its config describes: "
                              f"{exc}") from None
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
