"""Small configs for the federated tests."""

from __future__ import annotations


def digits_config(**fl):
    """A small digits config: MLP of 16 units, 10 clients with 2 labels each, 2 rounds."""
    from plait.config import Config, validate

    raw = {"model": {"arch": "mlp", "n_embd": 16, "n_layer": 1},
           "data": {"dataset": "digits", "val_fraction": 0.2},
           "train": {"weight_decay": 0.0, "grad_clip": 0.0},
           "fl": {"clients": 10, "rounds": 2, "local_epochs": 1, "batch_size": 10, "lr": 0.1,
                  "partition": "labels", "labels_per_client": 2, "min_clients": 2, **fl}}
    cfg = Config.from_dict(raw)
    validate(cfg)
    return cfg
