"""Run folders of the digits MLP as plait writes them: one process's checkpoint, and a
parameter-server run's per-server shards."""

from __future__ import annotations

from pathlib import Path

import torch

from plait.config import Config, ModelConfig
from plait.models import MLPClassifier
from plait.train.checkpoint import save_checkpoint


def mlp_config(hidden: int = 64, n_layer: int = 1) -> Config:
    cfg = Config(model=ModelConfig(arch="mlp", n_layer=n_layer, n_embd=hidden))
    cfg.data.dataset = "digits"
    cfg.data.val_fraction = 0.2
    return cfg


def trained_mlp(cfg: Config, steps: int = 150, seed: int = 0) -> MLPClassifier:
    """The digits MLP after `steps` Adam steps on the training split (about 95% held-out)."""
    from plait.data.digits import load_digits_splits

    train, _ = load_digits_splits(cfg.data.val_fraction)
    torch.manual_seed(seed)
    model = MLPClassifier(64, cfg.model.n_embd, cfg.model.n_layer, 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = train.batch(torch.randint(0, len(train), (32,), generator=g).tolist())
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def write_mlp_run(root: Path, cfg: Config, model: MLPClassifier, step: int = 5) -> Path:
    """A run folder with one checkpoint of `model` (model, optimizer and state, as the trainer saves)."""
    cfg.train.out_dir = str(root)
    optim = torch.optim.Adam(model.parameters())
    save_checkpoint(root / "checkpoints", step, {"model": model.state_dict(), "optim": optim.state_dict(),
                                                  "state": {"step": step, "config": cfg.to_dict()}})
    return root


def write_ps_run(root: Path, cfg: Config, model: MLPClassifier, servers: int = 2, version: int = 7) -> Path:
    """A parameter-server run folder: each server's contiguous shard of the flat parameters, in
    the layout `plait.parallel.parameter_server.checkpoint.save_server` writes."""
    from plait.parallel.parameter_server.sharding import FlatLayout

    flat = FlatLayout.of(model)
    vector = flat.read_params(model)
    cfg.parallel.ps.servers = servers
    for s, (start, stop) in enumerate(flat.shard_bounds(servers)):
        parts = {"model": {"shard": vector[start:stop].clone(), "bounds": [start, stop], "numel": flat.numel,
                           "n_servers": servers},
                 "optim": {}, "state": {"version": version, "clocks": {}, "mode": "sync",
                                        "config": cfg.to_dict()}}
        save_checkpoint(root / "checkpoints" / f"server_{s}", version, parts)
    return root
