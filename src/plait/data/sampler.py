"""A deterministic, resumable, re-shardable distributed sampler.

Each epoch is a permutation of the dataset fixed by (seed, epoch). The only state is the number
of samples the whole job has consumed in the current epoch, so the position means the same at
any data-parallel size: every draw takes the next `dp × batch` indices of the permutation and
hands rank r the r-th contiguous slice. Changing dp between draws therefore neither repeats nor
skips a sample. A tail shorter than one draw is left for this epoch (its samples come up again
in the next epoch's permutation).

On uneven hardware the draw can be split unevenly (:meth:`ElasticSampler.set_split`): rank r then
takes split[r] of the draw's indices instead of `batch_size`. The draws, and so the samples of
each step taken together, are the same as with the even split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from plait.errors import DataError


@dataclass
class ElasticSampler:
    """Hands each data-parallel rank its disjoint slice of every global draw."""

    num_samples: int
    dp_size: int
    dp_rank: int
    batch_size: int
    seed: int = 0
    epoch: int = 0
    consumed: int = 0
    shuffle: bool = True

    def __post_init__(self) -> None:
        self.split: list[int] | None = None  # per-rank share of each draw; None = batch_size each
        if not 0 <= self.dp_rank < self.dp_size:
            raise DataError(f"dp_rank {self.dp_rank} is outside [0, {self.dp_size})")
        if self.draw_size > self.num_samples:
            raise DataError(
                f"one global draw of dp×micro_batch_size = {self.dp_size}×{self.batch_size} = "
                f"{self.draw_size} sequences exceeds the {self.num_samples} sequences in the "
                "training data; use more text or a smaller train.micro_batch_size"
            )
        self._perm_epoch = -1
        self._perm: torch.Tensor | None = None

    @property
    def draw_size(self) -> int:
        return self.dp_size * self.batch_size

    @property
    def draws_per_epoch(self) -> int:
        return self.num_samples // self.draw_size

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm = torch.randperm(self.num_samples, generator=g)
            else:
                self._perm = torch.arange(self.num_samples)
            self._perm_epoch = epoch
        return self._perm

    def set_split(self, counts: list[int] | None) -> None:
        """Split each draw unevenly: rank r takes counts[r] indices (None: batch_size each).

        The counts must be ≥ 1 and sum to the draw size, dp × batch_size.
        """
        if counts is not None:
            if len(counts) != self.dp_size or sum(counts) != self.draw_size or min(counts) < 1:
                raise DataError(f"an uneven split {counts} must give each of the {self.dp_size} dp "
                                f"ranks ≥ 1 sequence and sum to the draw size {self.draw_size}")
            counts = [int(c) for c in counts]
        self.split = counts

    @property
    def local_batch(self) -> int:
        """This rank's share of each draw."""
        return self.batch_size if self.split is None else self.split[self.dp_rank]

    def next_indices(self) -> list[int]:
        """This rank's indices for the next draw; advances the shared position."""
        if self.consumed + self.draw_size > self.num_samples:
            self.epoch += 1
            self.consumed = 0
        offset = self.dp_rank * self.batch_size if self.split is None else sum(self.split[:self.dp_rank])
        start = self.consumed + offset
        idx = self.permutation(self.epoch)[start:start + self.local_batch].tolist()
        self.consumed += self.draw_size
        return idx

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed,
                "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position; the saved dp size does not matter, only the position."""
        if state["num_samples"] != self.num_samples:
            raise DataError(
                f"the checkpoint's sampler covered {state['num_samples']} sequences but the data "
                f"now has {self.num_samples}; resume with the same data and model.block_size"
            )
        self.seed, self.epoch, self.consumed = state["seed"], state["epoch"], state["consumed"]
