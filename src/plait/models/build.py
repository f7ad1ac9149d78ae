"""The plain model a [model] config names, built the same way by every kind of run."""

from __future__ import annotations

import torch
import torch.nn as nn

from plait.config import ModelConfig


def build_model(m: ModelConfig, seed: int) -> nn.Module:
    """`model.arch`'s plain model ("gpt" or the digits "mlp"), initialised from `seed`."""
    torch.manual_seed(seed)
    if m.arch == "mlp":
        from plait.data.digits import N_CLASSES, N_FEATURES
        from plait.models.mlp import MLPClassifier
        return MLPClassifier(N_FEATURES, m.n_embd, m.n_layer, N_CLASSES, m.dropout)
    from plait.models.gpt import GPT
    return GPT(m)
