"""Packed fixed-length training sequences over one token stream, with a held-out split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from plait.data.corpus import load_text
from plait.data.tokenizer import ByteTokenizer
from plait.errors import DataError


@dataclass
class TokenDataset:
    """Non-overlapping windows of `block_size + 1` tokens: inputs and next-token targets.

    Sample i covers tokens[i*block_size : (i+1)*block_size + 1].
    """

    tokens: np.ndarray
    block_size: int

    def __post_init__(self) -> None:
        if len(self) < 1:
            raise DataError(
                f"{len(self.tokens)} tokens are too few for one sequence of model.block_size="
                f"{self.block_size} (+1 target); use more text or a smaller block_size"
            )

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.block_size)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (len(indices), block_size) int64."""
        t = self.block_size
        rows = np.stack([self.tokens[i * t:(i * t) + t + 1] for i in indices]).astype(np.int64)
        data = torch.from_numpy(rows)
        return data[:, :-1], data[:, 1:]


def split_tokens(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The last `val_fraction` of the stream is held out (contiguous, so no window straddles)."""
    n_val = int(len(tokens) * val_fraction)
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:]


def load_token_splits(path: str, block_size: int, val_fraction: float,
                      cache_dir: str | None = None) -> tuple[TokenDataset, TokenDataset]:
    """Train and held-out datasets of the text at `path` (built-in corpus if empty)."""
    tokens = ByteTokenizer().encode(load_text(path, cache_dir))
    train, val = split_tokens(tokens, val_fraction)
    where = repr(path) if path else "the built-in corpus"
    for name, part in (("training", train), ("held-out", val)):
        if (len(part) - 1) // block_size < 1:
            raise DataError(
                f"data.path {where}: the {name} split has {len(part)} tokens, too few for one "
                f"sequence of model.block_size={block_size}; use more text, a smaller "
                f"block_size or another data.val_fraction"
            )
    return TokenDataset(train, block_size), TokenDataset(val, block_size)
