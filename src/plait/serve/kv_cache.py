"""The key/value cache: one fixed slot of full context length per running sequence.

Every slot spans the model's whole context (`block_size` positions), allocated once when the
engine starts, so a sequence admitted with prompt + max_tokens ≤ block_size can never run out of
room and nothing is copied or moved while it runs. A fixed length per slot is also what keeps
attention batch-invariant (see :mod:`plait.serve.runner`): every query attends over the same
number of positions whatever else is running.

Decoding attends over slots [0, highest busy slot], so the scheduler keeps busy slots packed at
the bottom: when a sequence finishes, the one in the highest slot moves down into its place.
"""

from __future__ import annotations

import heapq

import torch


class KVCache:
    """Keys, stored transposed as (n_layer, max_seqs, n_head, head_dim, block_size) so that
    queries multiply them without a copy, values as (n_layer, max_seqs, n_head, block_size,
    head_dim), and the free slots."""

    def __init__(self, n_layer: int, max_seqs: int, n_head: int, block_size: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        # Zeros, not empty: masked positions are multiplied by 0, which must not meet a NaN.
        self.k = torch.zeros(n_layer, max_seqs, n_head, head_dim, block_size, dtype=dtype, device=device)
        self.v = torch.zeros(n_layer, max_seqs, n_head, block_size, head_dim, dtype=dtype, device=device)
        self.max_seqs = max_seqs
        self.block_size = block_size
        self._free = list(range(max_seqs))  # a heap: the lowest free slot first keeps slots dense

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV-cache slot; the scheduler admits only while one is free")
        return heapq.heappop(self._free)

    def release(self, slot: int) -> None:
        heapq.heappush(self._free, slot)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst` (same values, so a
        sequence's results do not change when it moves)."""
        self.k[:, dst, :, :, :length] = self.k[:, src, :, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]
