"""A small multi-layer perceptron classifier: the digits demo's model (8×8 images, 10 classes)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLPClassifier(nn.Module):
    """`n_layer` hidden ReLU layers of `hidden` units; forward(x, targets) as the GPT does."""

    def __init__(self, in_features: int = 64, hidden: int = 64, n_layer: int = 1,
                 n_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(n_layer):
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits (B, n_classes); with targets, (logits, mean cross-entropy loss)."""
        logits = self.head(self.body(x))
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits, targets)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
