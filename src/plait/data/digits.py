"""scikit-learn's bundled handwritten digits (1,797 8×8 images, 10 classes): no download needed.

The held-out split is fixed (its own seed, independent of the training seed) so every run and
every worker evaluates on the same images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from plait.errors import DataError

SPLIT_SEED = 0
N_FEATURES = 64
N_CLASSES = 10


@dataclass
class DigitsDataset:
    """Images as flat float vectors in [0, 1] and their labels."""

    x: torch.Tensor  # (N, 64) float32
    y: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return self.x.size(0)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of the given sample indices."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return self.x[idx], self.y[idx]


def load_digits_splits(val_fraction: float) -> tuple[DigitsDataset, DigitsDataset]:
    """Training and held-out splits; the last `val_fraction` of a fixed shuffle is held out."""
    if not 0.0 < val_fraction < 0.5:
        raise DataError(f"data.val_fraction={val_fraction} must be in (0, 0.5) for the digits")
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = torch.tensor(raw.data, dtype=torch.float32) / 16.0  # pixel intensities are 0..16
    y = torch.tensor(raw.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_val = max(1, int(len(y) * val_fraction))
    train, val = perm[:-n_val], perm[-n_val:]
    return DigitsDataset(x[train], y[train]), DigitsDataset(x[val], y[val])
