"""A tiny digits-MLP run config for sweeps (a few hundred MLP steps at most)."""

from __future__ import annotations

from typing import Any

from plait.config import Config


def digits_base(out_dir, **train: Any) -> dict[str, Any]:
    """A raw config of the digits MLP: one process, evaluated every 20 steps."""
    cfg = Config.from_dict({
        "model": {"arch": "mlp", "n_layer": 1, "n_embd": 32},
        "data": {"dataset": "digits", "val_fraction": 0.2},
        "train": {"steps": 100, "micro_batch_size": 32, "lr": 1e-2, "min_lr": 1e-6, "warmup_steps": 5,
                  "weight_decay": 0.0, "grad_clip": 0.0, "eval_interval": 20, "eval_batches": 2,
                  "log_interval": 20, "seed": 0, "device": "cpu", "out_dir": str(out_dir), **train},
        "checkpoint": {"resume": "none"},
    }).to_dict()
    cfg.pop("tune")
    return cfg
